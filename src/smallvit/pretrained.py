"""Start a model from pretrained weights (`train.init_from`), matched by name, never by position (reference §9.4 bug).

Accepted sources, read without unpickling code (`torch.load(weights_only=True)` or safetensors):
- a smallvit run folder (its checkpoint.pt) or checkpoint file: the "model" entry;
- a timm VisionTransformer state dict (.pth/.pt or .safetensors), also inside a "state_dict" entry;
- a DINO-style checkpoint: a dict with a "teacher" (preferred) or "student" entry, keys possibly prefixed
  `module.` and/or `backbone.`; when `backbone.` keys exist only those are kept (the rest is the projection head).
  `smallvit pretrain` run folders hold such a checkpoint, so a run folder with a "teacher" takes the teacher.

The one key mapping between timm's VisionTransformer and smallvit's ViT (the rest of the names are equal):

| timm                               | smallvit                                             |
|------------------------------------|------------------------------------------------------|
| `patch_embed.proj.{weight,bias}`   | `patch_embed.{weight,bias}`                          |
| `blocks.N.attn.qkv.{weight,bias}`  | `blocks.N.attn.{q,k,v}.{weight,bias}` (q, k, v stacked on dim 0) |
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .runs import CHECKPOINT, CheckpointError, is_unsafe_refusal, unsafe_file_error

_QKV = re.compile(r"^(blocks\.\d+\.attn\.)qkv\.(weight|bias)$")
_QKV_SPLIT = re.compile(r"^(blocks\.\d+\.attn\.)([qkv])\.(weight|bias)$")
WRAPPER_KEYS = ("teacher", "student", "model_ema", "model", "state_dict")  # the first one present holds the weights


def timm_to_smallvit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm VisionTransformer state dict to smallvit's names; keys without a counterpart pass through."""
    out = {}
    for k, v in state.items():
        if k.startswith("patch_embed.proj."):
            out["patch_embed." + k[len("patch_embed.proj."):]] = v
        elif m := _QKV.match(k):
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m[1]}{name}.{m[2]}"] = part
        else:
            out[k] = v
    return out


def smallvit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `timm_to_smallvit` (q, k, v of full rank fused into qkv)."""
    out, parts = {}, {}
    for k, v in state.items():
        if k.startswith("patch_embed."):
            out["patch_embed.proj." + k[len("patch_embed."):]] = v
        elif m := _QKV_SPLIT.match(k):
            parts.setdefault((m[1], m[3]), {})[m[2]] = v
        else:
            out[k] = v
    for (prefix, kind), qkv in parts.items():
        out[f"{prefix}qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def _read_file(path: Path) -> object:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if is_unsafe_refusal(e):
            raise unsafe_file_error(path, "Pass weights saved as tensors (a state dict or .safetensors).") from None
        raise CheckpointError(f"train.init_from={path} cannot be read as weights (not a valid torch file); pass a "
                              f"smallvit run folder or checkpoint, a timm state dict (.pth, .safetensors) or a DINO "
                              f"checkpoint") from None
    except Exception as e:  # noqa: BLE001  (whatever the reader raises for a bad file, the user gets one line)
        raise CheckpointError(
            f"train.init_from={path} cannot be read as weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"pass a smallvit run folder or checkpoint, a timm state dict (.pth, .safetensors) or a DINO checkpoint"
        ) from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of `path` under smallvit's names, and a word for where they came from (e.g. "timm", "teacher")."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"train.init_from: no file at {path}; pass a run folder or a weights file")
    obj = _read_file(path)
    kind = "state dict"
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj, kind = obj[key], key
                break
    state = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)} if isinstance(obj, dict) else {}
    if not state:
        raise CheckpointError(f"train.init_from={path} holds no tensors by name (found {type(obj).__name__}); "
                              f"pass a state dict or a checkpoint with a model/teacher/student entry")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # DINO: the backbone; the projection head is dropped
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if any(_QKV.match(k) for k in state) or "patch_embed.proj.weight" in state:
        state, kind = timm_to_smallvit(state), f"timm ({kind})" if kind != "state dict" else "timm"
    return state, kind


def _resize_pos_embed(src: torch.Tensor, dst: torch.Tensor, num_cls: int) -> torch.Tensor | None:
    """Bicubic resize of the patch rows to dst's grid, CLS rows kept; None when only the grid cannot explain it."""
    from timm.layers import resample_abs_pos_embed

    n_src, n_dst = src.shape[1] - num_cls, dst.shape[1] - num_cls
    g_src, g_dst = round(n_src**0.5), round(n_dst**0.5)
    if src.dim() != 3 or src.shape[2] != dst.shape[2] or g_src**2 != n_src or g_dst**2 != n_dst:
        return None
    return resample_abs_pos_embed(src, [g_dst, g_dst], [g_src, g_src], num_prefix_tokens=num_cls)


def apply_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True,
                     source: str = "", kind: str = "") -> dict:
    """Copy the tensors of `state` (smallvit names) into `model` by name; return the report.

    The position embedding is resized to the model's grid; the head is left as initialised when the class count
    differs. Any other shape mismatch, missing key (except the head) or unexpected key raises CheckpointError
    when `strict`; otherwise those tensors keep the model's initialisation and the report lists them.
    """
    own = model.state_dict()
    fixed = {n for n, _ in model.named_buffers()}  # e.g. a sin-cos table: part of the architecture, kept
    report = {"source": source, "format": kind, "loaded": [], "reshaped": [], "reinitialised": [], "missing": [],
              "unexpected": sorted(set(state) - set(own)), "mismatched": [], "kept_fixed": []}
    load = {}
    # The head is loaded whole or not at all: a file for another class count (or without a head) gives a new one.
    head_fits = all(k in state and state[k].shape == v.shape for k, v in own.items() if k.startswith("head."))
    for k, target in own.items():
        if k in fixed:
            report["kept_fixed"].append(k)
            continue
        if k not in state:
            (report["reinitialised"] if k.startswith("head.") else report["missing"]).append(k)
            continue
        v = state[k]
        if k.startswith("head.") and not head_fits and v.shape[1:] == target.shape[1:]:
            report["reinitialised"].append(k)
        elif v.shape == target.shape and (head_fits or not k.startswith("head.")):
            load[k] = v
        elif k == "pos_embed" and (resized := _resize_pos_embed(v, target, getattr(model, "num_cls", 1))) is not None:
            load[k] = resized
            report["reshaped"].append({"key": k, "from": list(v.shape), "to": list(target.shape)})
        else:
            report["mismatched"].append({"key": k, "file": list(v.shape), "model": list(target.shape)})
    report["loaded"] = sorted(load)
    for key in ("reinitialised", "missing", "kept_fixed"):
        report[key].sort()
    problems = [f"shape mismatch {m['key']} {tuple(m['file'])} vs model {tuple(m['model'])}"
                for m in report["mismatched"][:5]]
    if report["missing"]:
        problems.append(f"missing {report['missing'][:5]}")
    if report["unexpected"]:
        problems.append(f"unexpected {report['unexpected'][:5]}")
    if not load:
        raise CheckpointError(f"train.init_from={source}: no tensor matches the model by name "
                              f"({'; '.join(problems) or 'nothing in common'}); is it a ViT state dict?")
    if strict and problems:
        raise CheckpointError(f"train.init_from={source} does not fit the model ({'; '.join(problems)}); "
                              f"use a matching model config, or train.init_strict=false to load only what fits")
    model.load_state_dict(load, strict=False)
    return report


def init_from(model: torch.nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Load the weights at `path` (any accepted source) into `model` by name; return the report (see above)."""
    state, kind = read_state_dict(path)
    return apply_state_dict(model, state, strict, str(path), kind)


def summary(report: dict) -> str:
    """One line for the console: counts, and what was resized or re-initialised."""
    parts = [f"{len(report['loaded'])} tensors loaded from {report['source']} ({report['format']})"]
    if report["reshaped"]:
        parts.append("resized " + ", ".join(f"{r['key']} {tuple(r['from'])}->{tuple(r['to'])}"
                                            for r in report["reshaped"]))
    for key in ("reinitialised", "missing", "unexpected", "kept_fixed"):
        if report[key]:
            parts.append(f"{key.replace('_', ' ')} {len(report[key])} ({', '.join(report[key][:4])})")
    if report["mismatched"]:
        parts.append(f"skipped {len(report['mismatched'])} mismatched ({report['mismatched'][0]['key']}, ...)")
    return "init_from: " + "; ".join(parts)
