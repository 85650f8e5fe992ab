"""Export a trained model to ONNX, TorchScript or a torch.export program, and check it against PyTorch.

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
from .model import ViT

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "torch.export": "model.pt2"}
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
    if fmt not in FORMATS:
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


def export(run_or_checkpoint: str | Path, fmt: str = "onnx", out: str | Path | None = None, opset: int = OPSET,
           exporter: str = "auto", check: bool = True) -> dict:
    """Export a run's model; write FILE and FILE.json (preprocessing, class names); with `check`, compare the
    export's logits with PyTorch's on a random batch of 3 (tolerance 1e-4). Returns a small report."""
    from .evaluate import load

    run = Path(run_or_checkpoint)
    model, cfg = load(run, "cpu")
    out = Path(out) if out else _default_out(run, fmt)
    export_model(model, fmt, out, opset, exporter)
    m = cfg.model
    try:
        meta = D.meta_of(cfg, getattr(model, "saved_dataset", None))
        prep = {"mean": list(meta.mean), "std": list(meta.std), "class_names": list(meta.class_names)}
    except D.DataError as e:  # a folder dataset that is not here any more: still export, say what is missing
        prep = {"mean": None, "std": None, "class_names": None, "note": str(e).splitlines()[0]}
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
        x = torch.randn(3, m.in_chans, m.img_size, m.img_size, generator=torch.Generator().manual_seed(0))
        try:
            diff = max_abs_diff(model, out, fmt, x)
        except ImportError as e:  # onnxruntime is optional at run time
            report["check"] = f"skipped ({e})"
            return report
        report["max_abs_diff"] = diff
        if not diff <= 1e-4:
            raise ExportError(f"{out} gives logits {diff:.2e} away from PyTorch's (tolerance 1e-4)")
    return report
