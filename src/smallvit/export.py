"""Export a trained model to ONNX, TorchScript or a torch.export program, and check it against PyTorch; or its
weights as a timm model folder (`--format timm`) or smallvit's own safetensors file (`--format safetensors`).

The exported graph maps a normalised float batch (B, 3, S, S) to logits (B, num_classes), B dynamic.
Preprocessing (RGB, resize, /255, mean/std) is not in the graph: a JSON file written next to the export
records it, with the class names, so that another runtime can reproduce `smallvit.load(run).preprocess`.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

from . import data as D
from .config import diff as diff_of
from .model import ViT

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "torch.export": "model.pt2",
           "safetensors": "model.safetensors", "timm": "timm"}  # timm: a folder for timm's local-dir: loader
TIMM_ARCH = "vit_tiny_patch16_224"  # a registered VisionTransformer name; config.json's model_args set every size
OPSET = 18  # the dynamo exporter's lowest opset; SDPA exports as plain MatMul/Softmax at 17 and above


class ExportError(RuntimeError):
    """The model could not be exported or the export does not reproduce it; the message says which."""


def _default_out(run: Path, fmt: str) -> Path:
    folder = run if run.is_dir() else run.parent
    return folder / FORMATS[fmt]


def onnx_exporter(choice: str = "auto") -> str:
    """auto: torch's dynamo exporter when onnxscript is installed, else the TorchScript-based one."""
    if choice == "auto":
        return "dynamo" if importlib.util.find_spec("onnxscript") else "torchscript"
    if choice not in ("dynamo", "torchscript"):
        raise ExportError(f"unknown ONNX exporter {choice!r}; choose auto, dynamo or torchscript")
    return choice


def export_model(model: ViT, fmt: str, out: str | Path, opset: int = OPSET, exporter: str = "auto") -> Path:
    """Write `model` (eval mode, on the CPU) in `fmt` to `out`; the batch axis stays dynamic."""
    if fmt not in ("onnx", "torchscript", "torch.export"):
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    c = model.cfg
    model = model.cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, c.in_chans, c.img_size, c.img_size)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():  # torch.jit and the legacy ONNX exporter announce their deprecation
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        if fmt == "onnx":
            names = {"input_names": ["images"], "output_names": ["logits"], "opset_version": opset}
            if onnx_exporter(exporter) == "dynamo":
                # external_data=False: one self-contained file (these models are far below protobuf's 2 GiB)
                torch.onnx.export(model, (x,), str(out), dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
                                  external_data=False, **names)
            else:
                torch.onnx.export(model, (x,), str(out), dynamo=False,
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **names)
        elif fmt == "torchscript":
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, x), str(out))
        else:
            torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), str(out))
    return out


def run_exported(path: str | Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Logits of an exported file for a normalised batch, computed by its own runtime (onnxruntime for ONNX)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        if fmt == "safetensors":  # loaded back the way smallvit.load reads it
            from .evaluate import load

            with torch.no_grad():
                return load(path)[0](x)
        if fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            if fmt == "torchscript":
                return torch.jit.load(str(path))(x)
            return torch.export.load(str(path)).module()(x)


def max_abs_diff(model: ViT, path: str | Path, fmt: str, x: torch.Tensor) -> float:
    """max |exported(x) - model(x)| on the CPU."""
    with torch.no_grad():
        ref = model.cpu().eval()(x)
    return (run_exported(path, fmt, x) - ref).abs().max().item()


def timm_model_args(m) -> dict:
    """timm VisionTransformer arguments for a smallvit ModelConfig, or ExportError naming what timm cannot express."""
    reasons = []
    if m.latent:
        reasons.append(f"low-rank q/k/v (model.latent={m.latent!r}): timm's ViT has one full-rank fused qkv")
    if m.num_cls_tokens > 1:
        reasons.append(f"{m.num_cls_tokens} CLS tokens (model.num_cls_tokens): timm's ViT has one class token")
    if m.class_attn_depth:
        reasons.append(f"class-attention blocks (model.class_attn_depth={m.class_attn_depth}): not part of timm's "
                       f"VisionTransformer")
    if m.norm_eps != 1e-6:
        reasons.append(f"LayerNorm eps {m.norm_eps} (model.norm_eps): timm's ViT config fixes 1e-6")
    if reasons:
        raise ExportError("timm's VisionTransformer cannot express this model: " + "; ".join(reasons)
                          + ". Use --format onnx, torchscript, torch.export or safetensors instead")
    return {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans, "num_classes": m.num_classes,
            "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio,
            "qkv_bias": m.qkv_bias, "patch_drop_rate": m.patch_drop,
            # no CLS token: timm's average pooling after the final norm (fc_norm off), as model.py's
            **({"class_token": True, "global_pool": "token"} if m.num_cls_tokens else
               {"class_token": False, "global_pool": "avg", "fc_norm": False})}


def to_timm(model: ViT):
    """timm's VisionTransformer holding `model`'s weights (eval mode); the key mapping is pretrained.py's."""
    import timm

    from .pretrained import smallvit_to_timm

    tm = timm.create_model(TIMM_ARCH, pretrained=False, **timm_model_args(model.cfg))
    tm.load_state_dict(smallvit_to_timm(model.state_dict()))  # strict: every tensor has its counterpart
    return tm.eval()


def _move_into(tmp: Path, out: Path) -> None:
    """Move the files of `tmp` into `out`, one atomic rename each (other files in `out` are left alone)."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def export_timm(model: ViT, out: Path, prep: dict, provenance: dict | None = None) -> Path:
    """Write `out`/model.safetensors + config.json (timm's own writer) for timm.create_model("local-dir:out")."""
    import inspect
    import tempfile

    from timm.models import save_for_hf

    tm = to_timm(model)
    c = model.cfg
    data = {"input_size": (c.in_chans, c.img_size, c.img_size), "interpolation": "bilinear", "crop_pct": 1.0}
    if prep.get("mean"):
        data.update(mean=tuple(prep["mean"]), std=tuple(prep["std"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        # The tag and licence would otherwise be inherited from TIMM_ARCH's ImageNet weights, which these are not.
        extra = {"pretrained_cfg": {"tag": "smallvit", "license": None}, "smallvit": provenance or {}}
        if prep.get("class_names"):
            extra["label_names"] = prep["class_names"]
        if "data_config" in inspect.signature(save_for_hf).parameters:
            save_for_hf(tm, tmp, safe_serialization=True, data_config=data, model_config=extra)
        else:  # older timm (1.0.28, pyproject's lower bound) records neither the preprocessing nor the model's
            # arguments by itself: both are written into config.json as timm.create_model("local-dir:") reads them
            tm.pretrained_cfg = {**tm.pretrained_cfg, **data, **extra.pop("pretrained_cfg")}
            save_for_hf(tm, tmp, safe_serialization=True, model_config=extra, model_args=timm_model_args(c))
        _move_into(Path(tmp), out)
        Path(tmp).mkdir()  # TemporaryDirectory removes it on exit
    return out


def export_safetensors(model: ViT, cfg, out: Path, prep: dict) -> Path:
    """smallvit's own state dict as safetensors; the metadata holds the config and the dataset facts."""
    from safetensors.torch import save

    from .config import to_dict
    from .runs import atomic_write_bytes

    dataset = {"num_classes": cfg.model.num_classes, **prep} if prep.get("mean") else None
    meta = {"format": "smallvit", "config": json.dumps(to_dict(cfg)), "dataset": json.dumps(dataset)}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out, lambda f: f.write(save(tensors, metadata=meta)))
    return out


def export(run_or_checkpoint: str | Path, fmt: str = "onnx", out: str | Path | None = None, opset: int = OPSET,
           exporter: str = "auto", check: bool = True) -> dict:
    """Export a run's model; write FILE and FILE.json (preprocessing, class names); with `check`, compare the
    export's logits with PyTorch's on a random batch of 3 (tolerance 1e-4; 1e-5 for timm). Returns a small report.

    `timm` writes a folder (model.safetensors + timm's config.json) that timm loads by itself."""
    from .evaluate import load_saved

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    run = Path(run_or_checkpoint)
    saved = load_saved(run, "cpu")
    model, cfg = saved.model, saved.cfg
    if fmt == "timm":
        timm_model_args(cfg.model)  # refuse before writing anything
    out = Path(out) if out else _default_out(run, fmt)
    m = cfg.model
    try:
        meta = saved.meta
        prep = {"mean": list(meta.mean), "std": list(meta.std), "class_names": list(meta.class_names)}
    except D.DataError as e:  # a folder dataset that is not here any more: still export, say what is missing
        prep = {"mean": None, "std": None, "class_names": None, "note": str(e).splitlines()[0]}
    x = torch.randn(3, m.in_chans, m.img_size, m.img_size, generator=torch.Generator().manual_seed(0))
    if fmt == "timm":
        export_timm(model, out, prep, {"source": str(run), "overrides": diff_of(cfg)})
        report = {"folder": str(out), "format": fmt, "load_with": f'timm.create_model("local-dir:{out}", '
                                                                   f'pretrained=True)'}
        if check:
            import timm

            with torch.no_grad():
                diff = (timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x) - model(x)).abs().max()
            report["max_abs_diff"] = diff.item()
            if not diff <= 1e-5:
                raise ExportError(f"timm's model from {out} gives logits {diff:.2e} away from smallvit's "
                                  f"(tolerance 1e-5)")
        return report
    if fmt == "safetensors":
        export_safetensors(model, cfg, out, prep)
    else:
        export_model(model, fmt, out, opset, exporter)
    side = {
        "format": fmt, "file": out.name, "source": str(run), "dataset": cfg.data.dataset,
        "input": {"name": "images", "shape": ["batch", m.in_chans, m.img_size, m.img_size], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", m.num_classes]},
        "preprocessing": f"RGB, resize to {m.img_size}x{m.img_size} (bilinear), divide by 255, (x - mean) / std",
        **prep,
    }
    if fmt == "onnx":
        side["opset"] = opset
        side["exporter"] = onnx_exporter(exporter)
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(side, indent=2) + "\n")
    report = {"file": str(out), "metadata": str(sidecar), "format": fmt}
    if check:
        try:
            diff = max_abs_diff(model, out, fmt, x)
        except ImportError as e:  # onnxruntime is optional at run time
            report["check"] = f"skipped ({e})"
            return report
        report["max_abs_diff"] = diff
        if not diff <= 1e-4:
            raise ExportError(f"{out} gives logits {diff:.2e} away from PyTorch's (tolerance 1e-4)")
    return report
