"""Batched AutoAugment and RandAugment on uint8 image tensors, with independent random parameters per sample.

The reference (reference §5.3.1) runs PIL AutoAugment image by image in DataLoader workers. Here a whole batch is
augmented on its own device: every sample draws its own sub-policy (or RandAugment ops), firing decisions and
signs, and each op family (KERNELS: point ops as one per-image lookup table, nearest or bilinear affine warps,
colour and sharpness blends) then runs once per stage, on the sub-batch that drew it (CPU) or on the whole batch
with neutral parameters elsewhere (CUDA). An AutoAugment sub-policy is two stages (op1, then op2); RandAugment is
`num_ops` stages. No per-image Python loop; on CPU one host sync per call, on CUDA none (see _apply_stages).

Magnitudes follow reference §5.3.1 through one fraction f in [0, 1] (AutoAugment: idx / 9; RandAugment: m / 30):
shear 0.3 f, translate (150/331) f of the width / height, rotate 30 f degrees, enhance factor 1 +- 0.9 f,
posterize 8 - round(4 f) bits (8,8,7,7,6,6,5,5,4,4 over idx 0..9), solarize threshold 256 (1 - f).

Deviations from the PIL reference, all deliberate:
- Interpolation: shear is bilinear (the reference is bicubic, which torchvision tensors do not offer for affine
  warps); translate and rotate are nearest, as the reference. Uncovered pixels are grey 128. Every warp runs in
  exact integer arithmetic (warp.py), so its pixels are the same on every machine, device and batch composition.
- Translations are rounded to whole pixels, so a nearest-neighbour translate is an exact shift.
- Rotation gets a random sign by default (standard AutoAugment); rotate_sign="ccw" keeps the reference's quirk of
  always rotating counter-clockwise (reference §12.19).
- Pixel ops follow torchvision.transforms.v2.functional on uint8 tensors (the tests compare against it); they can
  differ from PIL by one grey level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import cpu_kernels, warp

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "color", "contrast", "sharpness",
       "brightness", "posterize", "solarize", "autocontrast", "equalize", "invert")
OP_ID = {name: i for i, name in enumerate(OPS)}
SIGNED = frozenset({"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "color", "contrast", "sharpness",
                    "brightness"})
# torchvision.transforms.RandAugment's op list (no invert).
RAND_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
            "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")

# Sub-policies as (p1, op1, idx1, p2, op2, idx2), copied from reference §5.3.2 (idx of magnitude-free ops is unused).
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
    # The reference's 25 entries, duplicates included (reference §5.3.2 and 12.19), so sampling weights match it.
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


GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
# Point ops map every pixel value through a per-image (and per-channel) table of 256 entries.
POINT = ("brightness", "contrast", "posterize", "solarize", "autocontrast", "equalize", "invert")
# Op families that share one kernel call per stage (see _apply_stages); a family's ops are adjacent in KERNEL_ORDER.
KERNELS = (("shear_x", "shear_y"), ("translate_x", "translate_y", "rotate"), ("color",), ("sharpness",), POINT)
KERNEL_ORDER = ("identity",) + tuple(op for kernel in KERNELS for op in kernel)
_RANK = torch.tensor([KERNEL_ORDER.index(op) for op in OPS])  # op id -> position in KERNEL_ORDER


def _theta(op: str, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Integer affine maps (N, 2, 3) (warp.py) for shear / translate / rotate by the per-image values v (float).

    The inverse maps (output pixel -> input pixel) are those of PIL and torchvision, with the origin at the top-left
    corner: shear about the corner (x_in = x + v y), rotation about the centre, positive = counter-clockwise,
    translation by whole pixels.
    """
    if op == "shear_x":
        return warp.shear_x(v, H, W)
    if op == "shear_y":
        return warp.shear_y(v, H, W)
    if op in ("translate_x", "translate_y"):
        t = torch.round(v * (W if op == "translate_x" else H)).long()
        zero = torch.zeros_like(t)
        return warp.translate(t, zero) if op == "translate_x" else warp.translate(zero, t)
    if op == "rotate":
        return warp.rotate(v)
    raise ValueError(f"{op!r} is not a geometric op; geometric ops: {', '.join(GEOMETRIC)}")


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample each uint8 image through its own integer map (nearest or bilinear); grey fill outside the source."""
    if mode == "nearest":
        if cpu_kernels.usable(x):  # one pass: the same integer arithmetic, compiled
            return cpu_kernels.warp_nearest(x, theta, 128)
        return warp.nearest(x, theta, 128)
    if cpu_kernels.usable(x):
        return cpu_kernels.warp_bilinear(x, theta, 128)
    return warp.bilinear(x, theta, 128)


def _grey(xf: torch.Tensor) -> torch.Tensor:
    """Luma of a float RGB batch, floored as torchvision does for uint8 images (N, 1, H, W)."""
    if xf.shape[1] == 1:
        return xf
    return (0.2989 * xf[:, 0:1] + 0.587 * xf[:, 1:2] + 0.114 * xf[:, 2:3]).floor_()


def _blend(x: torch.Tensor, degenerate, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance x + (1 - f)(degenerate - x), one factor f per image; the cast truncates, as torchvision's
    uint8 kernels do. x is float; factor (N,) broadcasts over x's trailing dimensions."""
    f = factor.float().view(-1, *([1] * (x.dim() - 1)))
    return (x + (degenerate - x) * (1.0 - f)).clamp_(0, 255).to(torch.uint8)


def _enhance(x: torch.Tensor, op: str, factor: torch.Tensor) -> torch.Tensor:
    """Color (blend with the grey image) or sharpness (blend with a 3x3-smoothed image) with one factor per image.

    The blends have their weights rounded so that the float arithmetic is exact (_lerp_fixed): the same pixels on
    every machine and device (torch.lerp's result depends on FMA), within one grey level of torchvision.
    """
    w = (1.0 - factor.float()).view(-1, 1, 1, 1)
    xf = x.float()
    if op == "color":
        return _lerp_fixed(x, _grey(xf), w)
    # Sharpness: PIL's smoothing kernel (1s around a 5, / 13); the one-pixel border stays as it is (blend weight 0
    # there). Written as shifted sums over the flattened batch: contiguous 1-D adds, several times faster on CPU than
    # a grouped conv2d or 2-D slices; sums that wrap across rows, channels or images only land on the border. Exact
    # (integer sums; S / 13 is never within 1/26 of a tie, so multiplying by 1/13 rounds the same).
    N, C, H, W = x.shape
    f = xf.view(-1)
    L = f.numel()
    rows = f[:-2] + f[1:-1]
    rows += f[2:]  # rows[k]: sum of f[k .. k + 2]
    box = rows[:-2 * W] + rows[W:-W]
    box += rows[2 * W:]  # 3x3 sums centred on f[W + 1 .. L - W - 2]
    smooth = f.clone()
    smooth[W + 1:L - W - 1] = box.add_(f[W + 1:L - W - 1], alpha=4.0).mul_(1.0 / 13.0).round_()
    return _lerp_fixed(x, smooth.view(N, C, H, W), w, _interior(H, W, x.device))


def _lerp_fixed(x: torch.Tensor, target: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x + (target - x) w for uint8 x and whole-valued float target, truncated and clamped to uint8 as torchvision
    does, with each image's w (N, 1, 1, 1) rounded to a multiple of 2^-14 (times a 0/1 mask). Then every product
    (an 8-bit difference times a 16-bit weight) and every sum (24 bits) is exact in float32 for |w| < 4 (enhance
    factors in (-3, 5); the policies draw 0.1-1.9), so the result does not depend on the order of operations or
    FMA: the same on every machine and device (torch.lerp rounds its product, and differently with FMA)."""
    wq = torch.round(w.float() * 16384.0).mul_(1.0 / 16384.0)
    if mask is not None:
        wq = wq * mask
    xf = x.float()
    return (target - xf).mul_(wq).add_(xf).clamp_(0, 255).to(torch.uint8)


@functools.cache
def _interior(H: int, W: int, device: torch.device) -> torch.Tensor:
    """1 inside the one-pixel border, 0 on it: (1, 1, H, W) float."""
    m = torch.zeros(1, 1, H, W, device=device)
    m[:, :, 1:-1, 1:-1] = 1.0
    return m


def _point_lut(x: torch.Tensor, op: str, value: torch.Tensor) -> torch.Tensor:
    """The table (N, C, 256) uint8 that maps each pixel value of each image and channel for point op `op`.

    Every entry is computed with the same arithmetic torchvision applies pixel by pixel, so applying the table gives
    its results; a table costs 256 entries per channel instead of H * W, and one gather applies any mix of point ops.
    """
    N, C, H, W = x.shape
    v = torch.arange(256, device=x.device, dtype=torch.float32)
    if op == "posterize":
        keep = (256 - torch.exp2(8 - value)).to(torch.uint8)  # mask keeping the top `bits` bits: 8 -> 255, 4 -> 240
        lut = torch.arange(256, device=x.device, dtype=torch.uint8) & keep.view(N, 1, 1)
    elif op == "solarize":
        lut = torch.where(v >= value.view(N, 1, 1), 255 - v, v).to(torch.uint8)
    elif op == "invert":
        lut = (255 - v).to(torch.uint8).expand(N, 1, 256)
    elif op == "brightness":
        lut = _blend(v.expand(N, 1, 256), 0.0, 1.0 + value)
    elif op == "contrast":
        mean = _grey(x.float()).mean(dim=(1, 2, 3)).view(N, 1, 1)
        lut = _blend(v.expand(N, 1, 256), mean, 1.0 + value)
    elif op == "autocontrast":  # torchvision: (x - min) / ((max - min) / 255) per channel; flat channels unchanged
        lo = x.amin(dim=(2, 3)).float()[..., None]
        hi = x.amax(dim=(2, 3)).float()[..., None]
        flat = hi == lo
        scale = torch.where(flat, 1.0, (hi - lo) * (1.0 / 255.0))
        lut = (v - torch.where(flat, 0.0, lo)).div_(scale).clamp_(0, 255).to(torch.uint8)
    elif op == "equalize":
        # torchvision's (and PIL's) table from each channel's histogram, in float32: every count is a whole number
        # below 2^24 and the divisor at most 4 (32 x 32), so the floors are exact; integer division is far slower.
        if cpu_kernels.usable(x):
            hist = cpu_kernels.histograms(x).view(N * C, 256).float()
        else:  # a row per channel, by scatter-add: torch.bincount would read the input's min and max back on CUDA
            hist = _histograms(x)
        last = hist.gather(1, x.amax(dim=(2, 3)).view(N * C, 1).long())  # count of the largest value present
        step = (H * W - last).div_(255).floor_()
        # lut[k] = floor((sum of counts below k + step // 2) / step), lut[0] = 0; identity when step is 0 (one value
        # fills the channel), as PIL.
        table = hist.cumsum(1).sub_(hist).add_(step.div(2).floor_()).div_(step.clamp(min=1)).floor_().clamp_(max=255)
        lut = torch.where(step > 0, table, v)
        lut = lut.to(torch.uint8).view(N, C, 256)
    else:
        raise ValueError(f"{op!r} is not a point op; point ops: {', '.join(POINT)}")
    return lut.expand(N, C, 256)


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """Per-channel counts of each value of a uint8 batch (N, C, H, W), as float32 (N * C, 256), with no host sync.

    Counts are whole numbers below 2^24 (images up to 4096 x 4096 pixels), so float32 sums are exact in any order.
    """
    N, C, H, W = x.shape
    ones = torch.ones((), device=x.device).expand(N * C, H * W)
    return torch.zeros(N * C, 256, device=x.device).scatter_add_(1, x.reshape(N * C, H * W).long(), ones)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    if cpu_kernels.usable(x):
        return cpu_kernels.apply_lut(x, lut)
    N, C, H, W = x.shape
    return lut.gather(2, x.reshape(N, C, H * W).long()).view(N, C, H, W)


def apply_op(x: torch.Tensor, op: str, value: torch.Tensor) -> torch.Tensor:
    """Apply `op` to uint8 images (N, C, H, W) with one signed value per image (N,) in op_magnitude()'s units."""
    if op in GEOMETRIC:
        return _warp(x, _theta(op, value.float(), *x.shape[2:]), "bilinear" if op.startswith("shear") else "nearest")
    if op in ("color", "sharpness"):
        return _enhance(x, op, 1.0 + value)
    if op in POINT:
        return _apply_lut(x, _point_lut(x, op, value))
    if op == "identity":
        return x
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def _apply_kernel(x: torch.Tensor, kernel: tuple[str, ...], runs: list[tuple[str, int]], values: torch.Tensor
                  ) -> torch.Tensor:
    """One call for a sub-batch whose samples drew ops of one kernel, sorted by op: `runs` = [(op, count), ...]."""
    if kernel is POINT and cpu_kernels.usable(x):  # every table and the lookups in one compiled pass
        codes = torch.repeat_interleave(torch.tensor([POINT.index(op) for op, _ in runs]),
                                        torch.tensor([count for _, count in runs]))
        means, start = torch.zeros(x.shape[0]), 0
        for op, count in runs:  # contrast's grey mean, with PyTorch's float rounding (as _point_lut)
            if op == "contrast":
                means[start:start + count] = _grey(x[start:start + count].float()).mean(dim=(1, 2, 3))
            start += count
        return cpu_kernels.point_ops(x, codes, values, means)
    if len(runs) == 1:
        return apply_op(x, runs[0][0], values)
    parts, start = [], 0
    for op, count in runs:
        xs, vs = x[start:start + count], values[start:start + count]
        if kernel is POINT:
            parts.append(_point_lut(xs, op, vs))
        else:  # affine ops sharing one interpolation mode: one matrix per sample, one resampling
            parts.append(_theta(op, vs.float(), *x.shape[2:]))
        start += count
    if kernel is POINT:
        return _apply_lut(x, torch.cat(parts))
    return _warp(x, torch.cat(parts), "bilinear" if kernel[0].startswith("shear") else "nearest")


def _masked_kernel(x: torch.Tensor, kernel: tuple[str, ...], present: list[str], drawn: torch.Tensor,
                   values: torch.Tensor) -> torch.Tensor:
    """One kernel on the whole batch: each sample gets the op of `kernel` it drew, the others neutral parameters
    that reproduce them exactly (identity table, identity warp, blend weight 0). No host sync, static shapes."""
    B = x.shape[0]
    sel = {op: drawn == OP_ID[op] for op in present}
    safe = {op: torch.where(m, values, 0.0) for op, m in sel.items()}  # finite, in range, for samples not drawing op
    if kernel is POINT:
        lut = torch.arange(256, device=x.device, dtype=torch.uint8).expand(B, x.shape[1], 256)
        for op in present:
            lut = torch.where(sel[op].view(B, 1, 1), _point_lut(x, op, safe[op]), lut)
        return _apply_lut(x, lut)
    if kernel[0] in GEOMETRIC:
        theta = warp.identity(B, x.device)
        for op in present:
            theta = torch.where(sel[op].view(B, 1, 1), _theta(op, safe[op].float(), *x.shape[2:]), theta)
        return _warp(x, theta, "bilinear" if kernel[0].startswith("shear") else "nearest")
    (op,) = present  # color or sharpness: factor 1 leaves an image exactly as it is
    return _enhance(x, op, 1.0 + safe[op])


def _apply_stages(x: torch.Tensor, ops: torch.Tensor, values: torch.Tensor, fired: torch.Tensor,
                  candidates: tuple[str, ...] = OPS, sync_free: bool | None = None) -> torch.Tensor:
    """Run stage after stage, every sample through its own op of that stage where it fired.

    sync_free (default: on CUDA) never reads the draws on the host: each kernel of the policy runs once per stage on
    the whole batch, with neutral parameters for the samples that did not draw one of its ops (_masked_kernel). That
    wastes work that a GPU does not notice on 32-px images, and keeps the step free of host syncs (for CUDA graphs
    and an unblocked launch queue): per stage one table lookup for all point ops, two resamplings, two blends.
    On CPU (the default there) samples are sorted by op and each kernel (KERNELS: all point ops as one per-image
    lookup table, all nearest-neighbour affine ops as one resampling, ...) runs once per stage on only the samples
    that drew it, at the price of one host sync per call.
    """
    if sync_free if sync_free is not None else x.is_cuda:
        out = x
        for s in range(ops.shape[1]):
            drawn = torch.where(fired[:, s], ops[:, s], OP_ID["identity"])
            for kernel in KERNELS:
                present = [op for op in kernel if op in candidates]
                if present:
                    out = _masked_kernel(out, kernel, present, drawn, values[:, s])
        return out
    S, n = ops.shape[1], len(KERNEL_ORDER)
    B = x.shape[0]
    key = torch.where(fired, _RANK.to(x.device)[ops], 0)  # 0 = identity: drawn but not fired
    # All group sizes in one transfer: the only host sync of the whole call.
    counts = torch.bincount((key + n * torch.arange(S, device=x.device)).flatten(), minlength=n * S).view(S, n).tolist()
    # The batch is kept as one row of wide integers per image (uint8 row copies are several times slower), in the
    # order of the current stage's sort: each stage gathers the rows into its order once, each kernel works on its
    # contiguous run of samples in place, and one scatter at the end restores the input order.
    cur, pos = None, None  # cur[i] holds sample pos[i]
    for s in range(S):
        if counts[s][0] == B:
            continue
        order = torch.argsort(key[:, s], stable=True)  # samples sorted by op, ops grouped by kernel
        if cur is None:
            cur = _as_rows(x.contiguous()).index_select(0, order)  # channels-last or transposed input too
        else:
            where = torch.empty_like(pos).index_copy_(0, pos, torch.arange(B, device=x.device))  # sample -> row
            cur = cur.index_select(0, where.index_select(0, order))
        pos = order
        imgs = cur.view(torch.uint8).view(x.shape)
        vals = values[:, s].index_select(0, order)
        start, rank = counts[s][0], 1  # samples whose op did not fire come first and are never touched
        for kernel in KERNELS:
            runs = [(op, counts[s][rank + i]) for i, op in enumerate(kernel) if counts[s][rank + i]]
            rank += len(kernel)
            total = sum(c for _, c in runs)
            if total:
                part = imgs[start:start + total]
                part.copy_(_apply_kernel(part, kernel, runs, vals[start:start + total]))
            start += total
    if cur is None:
        return x.clone()
    return torch.empty_like(cur).index_copy_(0, pos, cur).view(torch.uint8).view(x.shape)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """A contiguous uint8 batch viewed as one row per image of the widest integer type that divides its size."""
    row = x[0].numel()
    dtype = next(d for d, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2), (torch.uint8, 1))
                 if row % size == 0)
    return x.view(x.shape[0], row).view(dtype)


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected a uint8 batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")


def _all(drawn: torch.Tensor) -> torch.Tensor:
    """The rows of a draw that one process takes when it holds the whole batch: all of them."""
    return drawn


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
def _rand_tables(frac: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RandAugment's (op ids of RAND_OPS, unsigned magnitude of every op in OPS at `frac`) on `device`; built once,
    since torch.tensor(..., device=cuda) is a blocking host-to-device copy."""
    return (torch.tensor([OP_ID[op] for op in RAND_OPS], device=device),
            torch.tensor([op_magnitude(op, frac) for op in OPS], device=device))


@functools.cache
def _signed_table(device: torch.device) -> torch.Tensor:
    return torch.tensor([op in SIGNED for op in OPS], device=device)


def autoaugment(x: torch.Tensor, policy: str = "cifar10", generator: torch.Generator | None = None,
                rotate_sign: str = "random", return_choices: bool = False, sync_free: bool | None = None,
                shard=None):
    """AutoAugment a uint8 batch (B, C, H, W) with `policy` (cifar10 | svhn | imagenet); same shape, dtype, device.

    Each sample draws one sub-policy uniformly, each of its two ops fires with its own probability, and signed ops
    get a random sign per sample and op. rotate_sign="ccw" makes every rotation counter-clockwise (the reference);
    the random draws are the same in both modes, so for one seed the two outputs differ only where a rotation
    fired with a negative sign. With return_choices=True, returns (images, Choices). With a data.Shard, x is that
    shard's rows and the choices are drawn for the global batches.
    """
    _check(x)
    if policy not in POLICIES:
        raise ValueError(f"unknown AutoAugment policy {policy!r}; choose from {', '.join(POLICIES)}")
    if rotate_sign not in ("random", "ccw"):
        raise ValueError(f"rotate_sign must be 'random' or 'ccw', got {rotate_sign!r}")
    B, dev = x.shape[0], x.device
    ops_t, probs_t, mags_t = _policy_tables(policy, dev)
    n, pick = (B, _all) if shard is None else (shard.global_n(B), shard.pick)
    sub = torch.randint(0, len(POLICIES[policy]), (n,), generator=generator, device=dev)
    fired = torch.rand((n, 2), generator=generator, device=dev) < probs_t[sub]
    sub, fired, sign = pick(sub), pick(fired), pick(_signs((n, 2), generator, dev))
    ops = ops_t[sub]
    if rotate_sign == "ccw":
        sign = torch.where(ops == OP_ID["rotate"], 1.0, sign)
    values = mags_t[sub] * torch.where(_signed_table(dev)[ops], sign, 1.0)
    candidates = tuple(sorted({r[1] for r in POLICIES[policy]} | {r[4] for r in POLICIES[policy]}))
    out = _apply_stages(x, ops, values, fired, candidates, sync_free)
    return (out, Choices(ops, values, fired, sub)) if return_choices else out


def randaugment(x: torch.Tensor, num_ops: int = 2, magnitude: int = 9, generator: torch.Generator | None = None,
                num_bins: int = 31, return_choices: bool = False, sync_free: bool | None = None, shard=None):
    """RandAugment a uint8 batch (B, C, H, W): `num_ops` ops per sample, drawn uniformly from RAND_OPS.

    As torchvision.transforms.RandAugment: `magnitude` is a bin on the 0..num_bins-1 scale (0..30 by default;
    9 and 2 ops are torchvision's defaults), signed ops get a random sign per sample and op, and every drawn op
    is applied. With a data.Shard, x is that shard's rows and the choices are drawn for the global batches.
    Solarize uses the AutoAugment threshold 256 (1 - f) rather than torchvision's 255 (1 - f).
    """
    _check(x)
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"magnitude must be in [0, {num_bins - 1}], got {magnitude}")
    B, dev = x.shape[0], x.device
    rand_ids, mags = _rand_tables(magnitude / (num_bins - 1), dev)
    n, pick = (B, _all) if shard is None else (shard.global_n(B), shard.pick)
    ops = pick(rand_ids[torch.randint(0, len(RAND_OPS), (n, num_ops), generator=generator, device=dev)])
    sign = pick(_signs((n, num_ops), generator, dev))
    values = mags[ops] * torch.where(_signed_table(dev)[ops], sign, 1.0)
    fired = torch.ones_like(ops, dtype=torch.bool)
    out = _apply_stages(x, ops, values, fired, RAND_OPS, sync_free)
    return (out, Choices(ops, values, fired)) if return_choices else out

