"""Batched AutoAugment / RandAugment: per-op equality with torchvision (and PIL), rates, seeds, shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from smallvit import autoaugment as A
from smallvit import warp

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


def fraction_to_boundary(v: float) -> float:
    """Distance of v * K from the nearest rounding boundary (a half-integer): how far a float value is from
    changing its fixed-point entry (warp.K), checked over every value the policies can draw."""
    f = v * warp.K - math.floor(v * warp.K)
    return abs(f - 0.5)


def images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random images plus noise: geometric ops move real structure, pixel ops see a full value range."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, channels, size // 4, size // 4, generator=g) * 255, size=(size, size),
                         mode="bilinear", align_corners=False)
    return (base + 12 * torch.randn(base.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def within_sigmas(count: float, n: int, p: float, k: float = 4.0) -> bool:
    """Binomial count within k standard deviations of n * p (exact when p is 0 or 1)."""
    return abs(count - n * p) <= k * math.sqrt(n * p * (1 - p)) + 1e-9


# ---------------------------------------------------------------------------------------------- magnitudes, tables

def test_magnitude_tables_match_spec():
    assert [A.op_magnitude("posterize", i / 9) for i in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert A.op_magnitude("solarize", 0.0) == 256.0 and A.op_magnitude("solarize", 1.0) == 0.0
    assert A.op_magnitude("solarize", 2 / 9) == pytest.approx(199.11, abs=0.01)
    assert A.op_magnitude("shear_y", 8 / 9) == pytest.approx(0.2667, abs=1e-4)
    assert A.op_magnitude("translate_x", 1.0) == pytest.approx(0.4532, abs=1e-4)
    assert A.op_magnitude("rotate", 2 / 9) == pytest.approx(6.667, abs=1e-3)
    assert A.op_magnitude("contrast", 6 / 9) == pytest.approx(0.6)
    # RandAugment bins agree with torchvision's linspace tables (31 bins).
    for m in (0, 9, 17, 30):
        f = m / 30
        assert A.op_magnitude("shear_x", f) == pytest.approx(float(torch.linspace(0, 0.3, 31)[m]), abs=1e-6)
        assert A.op_magnitude("rotate", f) == pytest.approx(float(torch.linspace(0, 30, 31)[m]), abs=1e-5)
        assert A.op_magnitude("color", f) == pytest.approx(float(torch.linspace(0, 0.9, 31)[m]), abs=1e-6)
        assert A.op_magnitude("posterize", f) == int((8 - torch.arange(31) / 7.5).round()[m])


def test_policies_are_well_formed():
    for name, rows in A.POLICIES.items():
        assert len(rows) == 25, name
        for p1, o1, i1, p2, o2, i2 in rows:
            assert o1 in A.OPS and o2 in A.OPS and 0 <= p1 <= 1 and 0 <= p2 <= 1 and 0 <= i1 <= 9 and 0 <= i2 <= 9
    c = A.POLICIES["cifar10"]
    assert c[1] == (0.7, "rotate", 2, 0.3, "translate_x", 9) and c[14][3] == 0.0 and c[21][1] == c[21][4]
    assert A.POLICIES["svhn"][0] == (0.9, "shear_x", 4, 0.2, "invert", 3)
    assert A.POLICIES["imagenet"][12] == (0.0, "equalize", 7, 0.8, "equalize", 8)


# ------------------------------------------------------------------------------------- per-op equality with torchvision

ENHANCE = {"brightness": TF.adjust_brightness, "color": TF.adjust_saturation, "contrast": TF.adjust_contrast,
           "sharpness": TF.adjust_sharpness}


@pytest.mark.parametrize("op", sorted(ENHANCE))
def test_enhance_ops_match_torchvision(op):
    x = images(32)
    v = torch.linspace(-0.9, 0.9, 32)  # a different signed magnitude per sample
    y = A.apply_op(x, op, v)
    ref = torch.stack([ENHANCE[op](x[i], 1.0 + float(v[i])) for i in range(32)])
    assert y.dtype == torch.uint8 and (y.int() - ref.int()).abs().max() <= 1


def test_posterize_solarize_and_parameter_free_ops_match_torchvision():
    x = images(16)
    bits = torch.tensor([8.0, 7, 6, 5, 4] * 3 + [4.0])
    ref = torch.stack([TF.posterize(x[i], int(bits[i])) for i in range(16)])
    assert torch.equal(A.apply_op(x, "posterize", bits), ref)
    thr = torch.tensor([A.op_magnitude("solarize", i / 9) for i in range(1, 10)] + [100.0] * 7)
    ref = torch.stack([TF.solarize(x[i], float(thr[i])) for i in range(16)])
    assert torch.equal(A.apply_op(x, "solarize", thr), ref)
    assert torch.equal(A.apply_op(x, "solarize", torch.full((16,), 256.0)), x)  # idx 0 is a no-op
    zero = torch.zeros(16)
    assert torch.equal(A.apply_op(x, "autocontrast", zero), TF.autocontrast(x))
    assert torch.equal(A.apply_op(x, "equalize", zero), torch.stack([TF.equalize(x[i]) for i in range(16)]))
    assert torch.equal(A.apply_op(x, "invert", zero), 255 - x)
    assert torch.equal(A.apply_op(x, "identity", zero), x)


def _tv_geometric(img: torch.Tensor, op: str, v: float, fill: float = 128) -> torch.Tensor:
    """torchvision's AutoAugment implementation of one geometric op (grey fill by default)."""
    H, W = img.shape[-2:]
    if op == "rotate":
        return TF.rotate(img, v, interpolation=InterpolationMode.NEAREST, fill=fill)
    if op.startswith("translate"):
        t = [round(v * W), 0] if op == "translate_x" else [0, round(v * H)]
        return TF.affine(img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.NEAREST, fill=fill)
    a = math.degrees(math.atan(v))
    shear = [a, 0.0] if op == "shear_x" else [0.0, a]
    return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                     interpolation=InterpolationMode.BILINEAR, fill=fill, center=[0, 0])


@pytest.mark.parametrize("op", ["translate_x", "translate_y", "rotate"])
def test_nearest_geometric_ops_match_torchvision(op):
    x = images(10)
    top = A.op_magnitude(op, 1.0)
    v = torch.tensor([1, -1, 0.3, -0.3, 2 / 9, -2 / 9, 0.0, 0.6, -0.6, 0.9]) * top
    y = A.apply_op(x, op, v)
    for i in range(10):
        d = (y[i].int() - _tv_geometric(x[i], op, float(v[i])).int()).abs()
        assert d.float().mean() < 0.05 and (d > 0).float().mean() < 0.01, (op, float(v[i]))


@pytest.mark.parametrize("op", ["shear_x", "shear_y"])
def test_shear_matches_torchvision_away_from_the_border_band(op):
    # torchvision blends the grey fill with the bilinear weight counted twice (mask * (S(x) - fill) + fill) on the
    # one-pixel band where the source leaves the image; we use the plain constant-padding blend there.
    x = images(8)
    v = torch.tensor([0.3, -0.3, 0.1, -0.2667, 0.0333, 0.0, 0.2, -0.05])
    y = A.apply_op(x, op, v)
    for i in range(8):
        ref = _tv_geometric(x[i], op, float(v[i]))
        cover = _tv_geometric(torch.ones(1, 32, 32), op, float(v[i]), fill=0).squeeze(0)  # share of in-image weight
        exact = (cover < 1e-4) | (cover > 1 - 1e-4)
        d = (y[i].int() - ref.int()).abs()
        assert d[:, exact].max() <= 1 and (~exact).float().mean() < 0.05
        assert d.float().mean() < 1.5


def test_geometric_conventions_match_pil_reference():
    # The reference uses PIL: shearX reads input (x + m y, y); rotate(+a) is counter-clockwise (reference §5.3.1).
    x = images(2)
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    for v in (0.3, -0.2):
        ref = pil.transform(pil.size, Image.AFFINE, (1, v, 0, 0, 1, 0), Image.BILINEAR, fillcolor=(128, 128, 128))
        ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
        y = A.apply_op(x[:1], "shear_x", torch.tensor([v]))[0]
        assert (y.int() - ref_t.int()).abs().float().mean() < 1.5
        assert (y.int() - ref_t.int()).abs().float().mean() * 10 < (y.int() - ref_t.flip(2).int()).abs().float().mean()
    for angle in (20.0, -10.0):
        ref = pil.rotate(angle, resample=Image.NEAREST, fillcolor=(128, 128, 128))
        ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1)
        y = A.apply_op(x[:1], "rotate", torch.tensor([angle]))[0]
        assert (y.int() != ref_t.int()).float().mean() < 0.03


# ------------------------------------------------------------------------------------------------- batched behaviour

def test_batched_output_equals_sequential_application_of_the_choices():
    x = images(64, size=16)
    for run in (lambda g: A.autoaugment(x, "cifar10", g, return_choices=True),
                lambda g: A.randaugment(x, 3, 17, g, return_choices=True)):
        y, ch = run(torch.Generator().manual_seed(3))
        for i in range(64):
            xi = x[i:i + 1]
            for s in range(ch.ops.shape[1]):
                if ch.fired[i, s]:
                    xi = A.apply_op(xi, A.OPS[int(ch.ops[i, s])], ch.values[i, s:s + 1])
            assert (xi[0].int() - y[i].int()).abs().max() <= 1, i


@pytest.mark.parametrize("policy", sorted(A.POLICIES))
@pytest.mark.parametrize("size", [16, 32])
def test_sync_free_path_equals_the_grouped_path(policy, size):
    """The CUDA default (each op family on the whole batch, neutral parameters for the samples that did not draw
    it: identity tables, identity warps, blend weight 0) gives the CPU default's images exactly."""
    x = images(96, size=size)
    grouped = A.autoaugment(x, policy, torch.Generator().manual_seed(5), sync_free=False)
    masked = A.autoaugment(x, policy, torch.Generator().manual_seed(5), sync_free=True)
    assert torch.equal(grouped, masked)
    grouped = A.randaugment(x, 2, 12, torch.Generator().manual_seed(6), sync_free=False)
    assert torch.equal(grouped, A.randaugment(x, 2, 12, torch.Generator().manual_seed(6), sync_free=True))


# ------------------------------------------------------------------------- machine independence (warp.py, _lerp_fixed)

def _policy_values() -> dict[str, set[float]]:
    """Every unsigned value of every op that AutoAugment (three policies) and RandAugment (all magnitudes) can draw,
    as the float32 the code computes."""
    vals: dict[str, set[float]] = {}
    for rows in A.POLICIES.values():
        for r in rows:
            for op, idx in ((r[1], r[2]), (r[4], r[5])):
                vals.setdefault(op, set()).add(A.op_magnitude(op, idx / 9))
    for m in range(31):
        for op in A.RAND_OPS:
            vals.setdefault(op, set()).add(A.op_magnitude(op, m / 30))
    return {op: {float(torch.tensor(v, dtype=torch.float32)) for v in vs} for op, vs in vals.items()}


def test_fixed_point_maps_are_far_from_rounding_boundaries():
    """The only floating point in a warp is rounding its map to multiples of 2^-16 (cos and sin in float64 for
    rotate). A 1-ulp difference between machines' cos/sin (about 1e-16, so 1e-11 after scaling) could change an
    entry only within that distance of a half-integer; every value the policies draw is much further away."""
    from smallvit import warp

    vals = _policy_values()
    for op in ("shear_x", "shear_y", "rotate"):
        for v in vals[op]:
            for s in (v, -v):
                if op == "rotate":
                    a = math.radians(s)
                    entries = (math.cos(a), math.sin(a))
                else:
                    entries = (s,)
                for e in entries:
                    assert fraction_to_boundary(e) > 1e-6, (op, s, e)
    # the float64 values torch computes round to the same entries as Python's math library
    degrees = torch.tensor(sorted(vals["rotate"]), dtype=torch.float32)
    M = warp.rotate(torch.cat([degrees, -degrees]))
    ref = [round(math.cos(math.radians(float(d))) * warp.K) for d in torch.cat([degrees, -degrees])]
    assert M[:, 0, 0].tolist() == ref


def test_nearest_warp_equals_an_exact_rational_reference():
    """Source pixel of every output pixel of a rotation, from the integer map with Python's exact integers
    (round half to even), equals warp.nearest; and the integer map is the true rotation to within 2^-17 per entry."""
    from fractions import Fraction

    from smallvit import warp

    x = images(3, size=12)
    degrees = torch.tensor([6.6666665, -30.0, 90.0])
    M = warp.rotate(degrees)
    out = warp.nearest(x, M, 128)
    H = W = 12
    for n in range(3):
        m = [[int(v) for v in row] for row in M[n]]
        c, s = math.cos(math.radians(float(degrees[n]))), math.sin(math.radians(float(degrees[n])))
        assert abs(m[0][0] / warp.K - c) <= 2**-17 and abs(m[1][0] / warp.K - s) <= 2**-17
        for i in range(H):
            for j in range(W):
                X, Y = 2 * j + 1 - W, 2 * i + 1 - H
                col = round(Fraction(m[0][0] * X + m[0][1] * Y + m[0][2] + (W - 1) * warp.K, 2 * warp.K))
                row = round(Fraction(m[1][0] * X + m[1][1] * Y + m[1][2] + (H - 1) * warp.K, 2 * warp.K))
                want = x[n, :, row, col] if 0 <= col < W and 0 <= row < H else torch.full((3,), 128, dtype=torch.uint8)
                assert torch.equal(out[n, :, i, j], want), (n, i, j)


@pytest.mark.parametrize("op", A.GEOMETRIC + ("color", "sharpness", "contrast", "brightness"))
def test_ops_do_not_depend_on_batch_composition(op):
    """An image gives the same pixels alone, in a batch, and in a reordered batch of another size: nothing in an
    op's arithmetic depends on which other images share the call (BLAS blocking, vector tails)."""
    x = images(37)
    top = A.op_magnitude(op, 1.0)
    v = torch.linspace(-1, 1, 37) * top
    whole = A.apply_op(x, op, v)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(3))[:29]
    assert torch.equal(A.apply_op(x[perm], op, v[perm]), whole[perm])
    for i in (0, 5, 36):
        assert torch.equal(A.apply_op(x[i:i + 1], op, v[i:i + 1]), whole[i:i + 1])


@pytest.mark.parametrize("policy", sorted(A.POLICIES))
def test_subpolicy_and_firing_rates(policy):
    B = 20000
    x = torch.randint(0, 256, (B, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    _, ch = A.autoaugment(x, policy, torch.Generator().manual_seed(2), return_choices=True)
    rows = A.POLICIES[policy]
    counts = torch.bincount(ch.subpolicy, minlength=25)
    for k, row in enumerate(rows):
        assert within_sigmas(int(counts[k]), B, 1 / 25), (k, int(counts[k]))
        chosen = ch.subpolicy == k
        for slot, p in enumerate((row[0], row[3])):
            assert within_sigmas(int(ch.fired[chosen, slot].sum()), int(chosen.sum()), p), (k, slot)
    expected = {A.OP_ID[r[j]] for r in rows for j in (1, 4)}
    assert set(ch.ops.unique().tolist()) <= expected
    # Signed ops get each sign half of the time; magnitudes match the table.
    signed = torch.tensor([A.OPS[o] in A.SIGNED for o in ch.ops.flatten().tolist()]).view_as(ch.ops)
    signed &= ch.values != 0
    if signed.any():
        n = int(signed.sum())
        assert within_sigmas(int((ch.values[signed] < 0).sum()), n, 0.5)
    k = int(ch.subpolicy[0])
    assert float(ch.values[0, 0].abs()) == pytest.approx(A.op_magnitude(rows[k][1], rows[k][2] / 9), rel=1e-6)


def test_randaugment_draws_ops_uniformly_and_always_applies_them():
    B = 12000
    x = torch.randint(0, 256, (B, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    _, ch = A.randaugment(x, 2, 9, torch.Generator().manual_seed(5), return_choices=True)
    assert ch.ops.shape == (B, 2) and bool(ch.fired.all()) and ch.subpolicy is None
    counts = torch.bincount(ch.ops.flatten(), minlength=len(A.OPS))
    for op in A.OPS:
        p = 1 / len(A.RAND_OPS) if op in A.RAND_OPS else 0.0
        assert within_sigmas(int(counts[A.OP_ID[op]]), 2 * B, p), op
    rot = ch.ops == A.OP_ID["rotate"]
    assert torch.allclose(ch.values[rot].abs(), torch.tensor(9.0))  # bin 9 of 0..30 -> 9 degrees
    assert within_sigmas(int((ch.values[rot] < 0).sum()), int(rot.sum()), 0.5)
    with pytest.raises(ValueError):
        A.randaugment(x[:2], 2, 31, torch.Generator())


@pytest.mark.parametrize("shape", [(5, 3, 32, 32), (3, 3, 24, 40), (4, 1, 16, 16), (1, 3, 8, 8), (0, 3, 32, 32)])
@pytest.mark.parametrize("kind", ["cifar10", "svhn", "imagenet", "rand"])
def test_shape_dtype_range_preserved(shape, kind):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    y = A.randaugment(x, 2, 30, g) if kind == "rand" else A.autoaugment(x, kind, g)
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
    assert x.data_ptr() != y.data_ptr() or x.numel() == 0  # the input is never modified in place
    if x.numel():  # any memory layout gives the same images
        again = (A.randaugment(x.contiguous(memory_format=torch.channels_last), 2, 30, torch.Generator().manual_seed(0))
                 if kind == "rand" else
                 A.autoaugment(x.contiguous(memory_format=torch.channels_last), kind, torch.Generator().manual_seed(0)))
        assert torch.equal(again, y)


def test_input_validation():
    g = torch.Generator()
    with pytest.raises(ValueError):
        A.autoaugment(torch.zeros(2, 3, 8, 8), "cifar10", g)  # float input
    with pytest.raises(ValueError):
        A.autoaugment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "cifar100", g)
    with pytest.raises(ValueError):
        A.autoaugment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "cifar10", g, rotate_sign="cw")


def test_seeds_reproduce_and_differ():
    x = images(128)
    x0 = x.clone()
    a = A.autoaugment(x, "cifar10", torch.Generator().manual_seed(7))
    b = A.autoaugment(x, "cifar10", torch.Generator().manual_seed(7))
    c = A.autoaugment(x, "cifar10", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(x, x0)
    r1 = A.randaugment(x, 2, 9, torch.Generator().manual_seed(7))
    assert torch.equal(r1, A.randaugment(x, 2, 9, torch.Generator().manual_seed(7)))
    assert not torch.equal(r1, A.randaugment(x, 2, 9, torch.Generator().manual_seed(8)))


def test_rotate_sign_ccw_only_flips_negative_rotations():
    x = images(3000, size=8)
    rnd, ch_r = A.autoaugment(x, "svhn", torch.Generator().manual_seed(4), return_choices=True)
    ccw, ch_c = A.autoaugment(x, "svhn", torch.Generator().manual_seed(4), rotate_sign="ccw", return_choices=True)
    rot = (ch_r.ops == A.OP_ID["rotate"]) & ch_r.fired
    assert torch.equal(ch_r.ops, ch_c.ops) and torch.equal(ch_r.fired, ch_c.fired)
    assert bool((ch_c.values[ch_c.ops == A.OP_ID["rotate"]] > 0).all())  # always counter-clockwise
    assert within_sigmas(int((ch_r.values[rot] < 0).sum()), int(rot.sum()), 0.5)  # random: both directions
    assert torch.equal(ch_r.values.abs(), ch_c.values.abs())
    flipped = ((ch_r.values < 0) & rot).any(1)
    differs = (rnd != ccw).flatten(1).any(1)
    assert bool(flipped.any()) and not bool((differs & ~flipped).any())  # same draws elsewhere
    assert differs[flipped].float().mean() > 0.9


@CUDA
def test_cuda_matches_contract_and_reproduces():
    x = images(256).cuda()
    g = torch.Generator(device="cuda")
    a = A.autoaugment(x, "cifar10", g.manual_seed(1))
    b = A.autoaugment(x, "cifar10", g.manual_seed(1))
    assert a.device == x.device and a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    r = A.randaugment(x, 2, 9, g.manual_seed(1))
    assert r.device == x.device and r.dtype == torch.uint8
    # Same op, same per-sample values: the CUDA kernels agree with the CPU ones up to rounding.
    for op in ("shear_x", "rotate", "translate_y", "sharpness", "contrast", "equalize", "posterize"):
        v = torch.full((256,), A.op_magnitude(op, 0.7))
        d = (A.apply_op(x, op, v.cuda()).cpu().int() - A.apply_op(x.cpu(), op, v).int()).abs()
        assert d.float().mean() < 0.05, op
