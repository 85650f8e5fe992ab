"""Batched AutoAugment and RandAugment on uint8 image tensors, with independent random parameters per sample.

The reference (SPEC 5.3.1) runs PIL AutoAugment image by image in DataLoader workers. Here a whole batch is
augmented on its own device: every sample draws its own sub-policy (or RandAugment ops), firing decisions and
signs, and each op type is then applied once per stage to the sub-batch that drew it. An AutoAugment sub-policy is
two stages (op1, then op2); RandAugment is `num_ops` stages. No per-image Python loop; on CPU one host sync per
call, on CUDA none (see _apply_stages).

Magnitudes follow SPEC 5.3.1 through one fraction f in [0, 1] (AutoAugment: idx / 9; RandAugment: m / 30):
shear 0.3 f, translate (150/331) f of the width / height, rotate 30 f degrees, enhance factor 1 +- 0.9 f,
posterize 8 - round(4 f) bits (8,8,7,7,6,6,5,5,4,4 over idx 0..9), solarize threshold 256 (1 - f).

Deviations from the PIL reference, all deliberate:
- Interpolation: shear is bilinear (the reference is bicubic, which torchvision tensors do not offer for affine
  warps); translate and rotate are nearest, as the reference. Uncovered pixels are grey 128.
- Translations are rounded to whole pixels, so a nearest-neighbour translate is an exact shift.
- Rotation gets a random sign by default (standard AutoAugment); rotate_sign="ccw" keeps the reference's quirk of
  always rotating counter-clockwise (SPEC 12.19).
- Pixel ops follow torchvision.transforms.v2.functional on uint8 tensors (the tests compare against it); they can
  differ from PIL by one grey level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

FILL = 128.0  # grey fill for geometric ops (SPEC 5.3)

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "color", "contrast", "sharpness",
       "brightness", "posterize", "solarize", "autocontrast", "equalize", "invert")
OP_ID = {name: i for i, name in enumerate(OPS)}
SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "color", "contrast", "sharpness",
                    "brightness"})
# torchvision.transforms.RandAugment's op list (no invert).
RAND_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
            "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")

# Sub-policies as (p1, op1, idx1, p2, op2, idx2), copied from SPEC 5.3.2 (idx of magnitude-free ops is unused).
POLICIES: dict[str, tuple[tuple[float, str, int, float, str, int], ...]] = {
    "cifar10": (
        (0.1, "invert", 0, 0.2, "contrast", 6),
        (0.7, "rotate", 2, 0.3, "translate_x", 9),
        (0.8, "sharpness", 1, 0.9, "sharpness", 3),
        (0.5, "shear_y", 8, 0.7, "translate_y", 9),
        (0.5, "autocontrast", 0, 0.9, "equalize", 0),
        (0.2, "shear_y", 7, 0.3, "posterize", 7),
        (0.4, "color", 3, 0.6, "brightness", 7),
        (0.3, "sharpness", 9, 0.7, "brightness", 9),
        (0.6, "equalize", 0, 0.5, "equalize", 0),
        (0.6, "contrast", 7, 0.6, "sharpness", 5),
        (0.7, "color", 7, 0.5, "translate_x", 8),
        (0.3, "equalize", 0, 0.4, "autocontrast", 0),
        (0.4, "translate_y", 3, 0.2, "sharpness", 6),
        (0.9, "brightness", 6, 0.2, "color", 8),
        (0.5, "solarize", 2, 0.0, "invert", 0),
        (0.2, "equalize", 0, 0.6, "autocontrast", 0),
        (0.2, "equalize", 0, 0.6, "equalize", 0),
        (0.9, "color", 9, 0.6, "equalize", 0),
        (0.8, "autocontrast", 0, 0.2, "solarize", 8),
        (0.1, "brightness", 3, 0.7, "color", 0),
        (0.4, "solarize", 5, 0.9, "autocontrast", 0),
        (0.9, "translate_y", 9, 0.7, "translate_y", 9),
        (0.9, "autocontrast", 0, 0.8, "solarize", 3),
        (0.8, "equalize", 0, 0.1, "invert", 0),
        (0.7, "translate_y", 9, 0.9, "autocontrast", 0),
    ),
    "svhn": (
        (0.9, "shear_x", 4, 0.2, "invert", 3),
        (0.9, "shear_y", 8, 0.7, "invert", 5),
        (0.6, "equalize", 5, 0.6, "solarize", 6),
        (0.9, "invert", 3, 0.6, "equalize", 3),
        (0.6, "equalize", 1, 0.9, "rotate", 3),
        (0.9, "shear_x", 4, 0.8, "autocontrast", 3),
        (0.9, "shear_y", 8, 0.4, "invert", 5),
        (0.9, "shear_y", 5, 0.2, "solarize", 6),
        (0.9, "invert", 6, 0.8, "autocontrast", 1),
        (0.6, "equalize", 3, 0.9, "rotate", 3),
        (0.9, "shear_x", 4, 0.3, "solarize", 3),
        (0.8, "shear_y", 8, 0.7, "invert", 4),
        (0.9, "equalize", 5, 0.6, "translate_y", 6),
        (0.9, "invert", 4, 0.6, "equalize", 7),
        (0.3, "contrast", 3, 0.8, "rotate", 4),
        (0.8, "invert", 5, 0.0, "translate_y", 2),
        (0.7, "shear_y", 6, 0.4, "solarize", 8),
        (0.6, "invert", 4, 0.8, "rotate", 4),
        (0.3, "shear_y", 7, 0.9, "translate_x", 3),
        (0.1, "shear_x", 6, 0.6, "invert", 5),
        (0.7, "solarize", 2, 0.6, "translate_y", 7),
        (0.8, "shear_y", 4, 0.8, "invert", 8),
        (0.7, "shear_x", 9, 0.8, "translate_y", 3),
        (0.8, "shear_y", 5, 0.7, "autocontrast", 3),
        (0.7, "shear_x", 2, 0.1, "invert", 5),
    ),
    # The reference's 25 entries, duplicates included (SPEC 5.3.2 and 12.19), so sampling weights match it.
    "imagenet": (
        (0.4, "posterize", 8, 0.6, "rotate", 9),
        (0.6, "solarize", 5, 0.6, "autocontrast", 5),
        (0.8, "equalize", 8, 0.6, "equalize", 3),
        (0.6, "posterize", 7, 0.6, "posterize", 6),
        (0.4, "equalize", 7, 0.2, "solarize", 4),
        (0.4, "equalize", 4, 0.8, "rotate", 8),
        (0.6, "solarize", 3, 0.6, "equalize", 7),
        (0.8, "posterize", 5, 1.0, "equalize", 2),
        (0.2, "rotate", 3, 0.6, "solarize", 8),
        (0.6, "equalize", 8, 0.4, "posterize", 6),
        (0.8, "rotate", 8, 0.4, "color", 0),
        (0.4, "rotate", 9, 0.6, "equalize", 2),
        (0.0, "equalize", 7, 0.8, "equalize", 8),
        (0.6, "invert", 4, 1.0, "equalize", 8),
        (0.6, "color", 4, 1.0, "contrast", 8),
        (0.8, "rotate", 8, 1.0, "color", 2),
        (0.8, "color", 8, 0.8, "solarize", 7),
        (0.4, "sharpness", 7, 0.6, "invert", 8),
        (0.6, "shear_x", 5, 1.0, "equalize", 9),
        (0.4, "color", 0, 0.6, "equalize", 3),
        (0.4, "equalize", 7, 0.2, "solarize", 4),
        (0.6, "solarize", 5, 0.6, "autocontrast", 5),
        (0.6, "invert", 4, 1.0, "equalize", 8),
        (0.6, "color", 4, 1.0, "contrast", 8),
        (0.8, "equalize", 8, 0.6, "equalize", 3),
    ),
}


@dataclass(frozen=True)
class Choices:
    """What was drawn per sample: op ids into OPS (B, S), signed values (B, S), fired (B, S), sub-policy (B,)."""

    ops: torch.Tensor
    values: torch.Tensor
    fired: torch.Tensor
    subpolicy: torch.Tensor | None = None


def op_magnitude(op: str, frac: float) -> float:
    """Unsigned magnitude of `op` at strength `frac` in [0, 1], in the unit apply_op expects (module docstring)."""
    if op in ("shear_x", "shear_y"):
        return 0.3 * frac
    if op in ("translate_x", "translate_y"):
        return 150.0 / 331.0 * frac  # a fraction of the image width / height
    if op == "rotate":
        return 30.0 * frac  # degrees
    if op in ("color", "contrast", "sharpness", "brightness"):
        return 0.9 * frac  # the enhance factor is 1 + value
    if op == "posterize":
        return float(8 - round(4 * frac))  # bits kept; no .5 ties occur for idx/9 or m/30
    if op == "solarize":
        return 256.0 * (1.0 - frac)  # threshold; 256 leaves every uint8 value alone
    return 0.0


def _affine(x: torch.Tensor, op: str, v: torch.Tensor) -> torch.Tensor:
    """Warp each image by its own shear / translate / rotate value; grey fill outside the source."""
    N, C, H, W = x.shape
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    # Inverse maps (output pixel -> input pixel) in pixel units, origin at the top-left corner, as PIL and
    # torchvision: shear about the corner (x_in = x + v y), rotation about the centre, positive = counter-clockwise.
    if op == "shear_x":
        m = (one, v, zero, zero, one, zero)
    elif op == "shear_y":
        m = (one, zero, zero, v, one, zero)
    elif op == "translate_x":
        m = (one, zero, -torch.round(v * W), zero, one, zero)
    elif op == "translate_y":
        m = (one, zero, zero, zero, one, -torch.round(v * H))
    else:
        a = torch.deg2rad(v)
        c, s, cx, cy = a.cos(), a.sin(), W / 2, H / 2
        m = (c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy)
    m3 = torch.cat([torch.stack(m, 1).view(N, 2, 3), x.new_tensor([0.0, 0.0, 1.0], dtype=v.dtype).expand(N, 1, 3)], 1)
    # grid_sample works in normalised coordinates (align_corners=False): pixel = (u + 1) * size / 2.
    to_px = x.new_tensor([[W / 2, 0, W / 2], [0, H / 2, H / 2], [0, 0, 1]], dtype=v.dtype)
    to_norm = x.new_tensor([[2 / W, 0, -1], [0, 2 / H, -1], [0, 0, 1]], dtype=v.dtype)
    theta = (to_norm @ m3 @ to_px)[:, :2]
    grid = F.affine_grid(theta, [N, C, H, W], align_corners=False)
    mode = "bilinear" if op.startswith("shear") else "nearest"
    # Sampling (x - FILL) with zero padding and adding FILL back gives exact grey where the source is missing.
    out = F.grid_sample(x.to(v.dtype) - FILL, grid, mode=mode, padding_mode="zeros", align_corners=False) + FILL
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _grey(xf: torch.Tensor) -> torch.Tensor:
    """Luma of a float RGB batch, floored as torchvision does for uint8 images (N, 1, H, W)."""
    if xf.shape[1] == 1:
        return xf
    return (0.2989 * xf[:, 0:1] + 0.587 * xf[:, 1:2] + 0.114 * xf[:, 2:3]).floor_()


def _enhance(x: torch.Tensor, op: str, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance-style blend x + (1 - f)(degenerate - x) with one factor f per image."""
    xf = x.float()
    if op == "brightness":
        deg = torch.zeros_like(xf)
    elif op == "color":
        deg = _grey(xf).expand_as(xf)
    elif op == "contrast":
        deg = _grey(xf).mean(dim=(1, 2, 3), keepdim=True).expand_as(xf)
    else:  # sharpness: 3x3 smoothing kernel (1s around a 5, / 13); the one-pixel border is left as it is
        C = x.shape[1]
        k = xf.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]).div_(13.0).expand(C, 1, 3, 3)
        deg = xf.clone()
        deg[:, :, 1:-1, 1:-1] = F.conv2d(xf, k, groups=C).round_()
    f = factor.view(-1, 1, 1, 1).float()
    # The cast truncates, as torchvision's uint8 kernels do.
    return (xf + (deg - xf) * (1.0 - f)).clamp_(0, 255).to(torch.uint8)


def apply_op(x: torch.Tensor, op: str, value: torch.Tensor) -> torch.Tensor:
    """Apply `op` to uint8 images (N, C, H, W) with one signed value per image (N,) in op_magnitude()'s units."""
    if op in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        return _affine(x, op, value.float())
    if op in ("color", "contrast", "sharpness", "brightness"):
        return _enhance(x, op, 1.0 + value)
    if op == "posterize":
        keep = 256 - torch.exp2(8 - value)  # mask keeping the top `bits` bits: 8 -> 255, 4 -> 240
        return x & keep.to(torch.uint8).view(-1, 1, 1, 1)
    if op == "solarize":
        return torch.where(x >= value.view(-1, 1, 1, 1), 255 - x, x)
    if op == "autocontrast":
        return TF.autocontrast(x)
    if op == "equalize":
        return TF.equalize(x)
    if op == "invert":
        return TF.invert(x)
    if op == "identity":
        return x
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def _apply_stages(x: torch.Tensor, ops: torch.Tensor, values: torch.Tensor, fired: torch.Tensor,
                  candidates: tuple[str, ...] = OPS, sync_free: bool | None = None) -> torch.Tensor:
    """Run stage after stage; in each, every op type is applied once to the samples that drew and fired it.

    sync_free (default: on CUDA) never reads the draws on the host: each candidate op runs on the whole batch and
    a mask keeps it where it was drawn. That wastes work that a GPU does not notice on 32-px images, and keeps the
    step free of host syncs (for CUDA graphs and an unblocked launch queue). On CPU, gathering the sub-batches is
    several times cheaper, at the price of one sync per call.
    """
    if sync_free if sync_free is not None else x.is_cuda:
        out = x
        for s in range(ops.shape[1]):
            for op in candidates:
                if op == "identity":
                    continue
                sel = (fired[:, s] & (ops[:, s] == OP_ID[op])).view(-1, 1, 1, 1)
                out = torch.where(sel, apply_op(out, op, values[:, s]), out)
        return out
    S = ops.shape[1]
    n = len(OPS) + 1  # the extra bucket collects samples whose op did not fire
    key = torch.where(fired, ops, len(OPS))
    # All group sizes in one transfer: the only host sync of the whole call.
    counts = torch.bincount((key + n * torch.arange(S, device=x.device)).flatten(), minlength=n * S).view(S, n).tolist()
    out = x.clone()
    for s in range(S):
        order = torch.argsort(key[:, s], stable=True)  # samples grouped by op id
        start = 0
        for op_id, count in enumerate(counts[s][:-1]):
            if count and OPS[op_id] != "identity":
                idx = order[start:start + count]
                out.index_copy_(0, idx, apply_op(out.index_select(0, idx), OPS[op_id], values[idx, s]))
            start += count
    return out


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected a uint8 batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")


def _signs(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g, device=device).float().mul_(2).sub_(1)


@functools.cache
def _policy_tables(policy: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(op ids, probabilities, unsigned magnitudes), each (n_subpolicies, 2), on `device`; built once."""
    rows = POLICIES[policy]
    ops = [[OP_ID[r[1]], OP_ID[r[4]]] for r in rows]
    probs = [[r[0], r[3]] for r in rows]
    mags = [[op_magnitude(r[1], r[2] / 9), op_magnitude(r[4], r[5] / 9)] for r in rows]
    return (torch.tensor(ops, device=device), torch.tensor(probs, device=device),
            torch.tensor(mags, device=device))


@functools.cache
def _signed_table(device: torch.device) -> torch.Tensor:
    return torch.tensor([op in SIGNED for op in OPS], device=device)


def autoaugment(x: torch.Tensor, policy: str = "cifar10", generator: torch.Generator | None = None,
                rotate_sign: str = "random", return_choices: bool = False, sync_free: bool | None = None):
    """AutoAugment a uint8 batch (B, C, H, W) with `policy` (cifar10 | svhn | imagenet); same shape, dtype, device.

    Each sample draws one sub-policy uniformly, each of its two ops fires with its own probability, and signed ops
    get a random sign per sample and op. rotate_sign="ccw" makes every rotation counter-clockwise (the reference);
    the random draws are the same in both modes, so for one seed the two outputs differ only where a rotation
    fired with a negative sign. With return_choices=True, returns (images, Choices).
    """
    _check(x)
    if policy not in POLICIES:
        raise ValueError(f"unknown AutoAugment policy {policy!r}; choose from {', '.join(POLICIES)}")
    if rotate_sign not in ("random", "ccw"):
        raise ValueError(f"rotate_sign must be 'random' or 'ccw', got {rotate_sign!r}")
    B, dev = x.shape[0], x.device
    ops_t, probs_t, mags_t = _policy_tables(policy, dev)
    sub = torch.randint(0, len(POLICIES[policy]), (B,), generator=generator, device=dev)
    fired = torch.rand((B, 2), generator=generator, device=dev) < probs_t[sub]
    sign = _signs((B, 2), generator, dev)
    ops = ops_t[sub]
    if rotate_sign == "ccw":
        sign = torch.where(ops == OP_ID["rotate"], 1.0, sign)
    values = mags_t[sub] * torch.where(_signed_table(dev)[ops], sign, 1.0)
    candidates = tuple(sorted({r[1] for r in POLICIES[policy]} | {r[4] for r in POLICIES[policy]}))
    out = _apply_stages(x, ops, values, fired, candidates, sync_free)
    return (out, Choices(ops, values, fired, sub)) if return_choices else out


def randaugment(x: torch.Tensor, num_ops: int = 2, magnitude: int = 9, generator: torch.Generator | None = None,
                num_bins: int = 31, return_choices: bool = False, sync_free: bool | None = None):
    """RandAugment a uint8 batch (B, C, H, W): `num_ops` ops per sample, drawn uniformly from RAND_OPS.

    As torchvision.transforms.RandAugment: `magnitude` is a bin on the 0..num_bins-1 scale (0..30 by default;
    9 and 2 ops are torchvision's defaults), signed ops get a random sign per sample and op, and every drawn op
    is applied.
    Solarize uses the AutoAugment threshold 256 (1 - f) rather than torchvision's 255 (1 - f).
    """
    _check(x)
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be in [0, {num_bins - 1}], got {magnitude}")
    B, dev = x.shape[0], x.device
    frac = magnitude / (num_bins - 1)
    rand_ids = torch.tensor([OP_ID[op] for op in RAND_OPS], device=dev)
    mags = torch.tensor([op_magnitude(op, frac) for op in OPS], device=dev)
    ops = rand_ids[torch.randint(0, len(RAND_OPS), (B, num_ops), generator=generator, device=dev)]
    sign = _signs((B, num_ops), generator, dev)
    values = mags[ops] * torch.where(_signed_table(dev)[ops], sign, 1.0)
    fired = torch.ones_like(ops, dtype=torch.bool)
    out = _apply_stages(x, ops, values, fired, RAND_OPS, sync_free)
    return (out, Choices(ops, values, fired)) if return_choices else out

