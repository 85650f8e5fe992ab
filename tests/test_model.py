import math

import pytest
import torch

from conftest import seeded_vit
from smallvit.backbones import build_model
from smallvit.config import ConfigError
from smallvit.experiments import ABLATIONS, make_config
from smallvit.model import count_params, flops_per_image, sincos_pos_embed


@pytest.mark.parametrize("ablation,expected", [
    ("baseline", 3_588_682),  # reference §6.1
    ("depth9", 2_697_610),
    ("mla-q", 3_441_226), ("mla-k", 3_441_226),  # reference §6.6
    ("mla-qk", 3_293_770), ("mla-kv", 3_293_770),
    ("mla-qkv", 3_146_314),
    ("cls2", 3_590_986), ("cls4", 3_595_594), ("cls8", 3_604_810),  # reference §6.7
    ("cls4-ca2", 4_263_754),
])
def test_parameter_counts(ablation, expected):
    assert count_params(build_model(make_config("baseline", ablation=ablation).model)) == expected


def test_class_attention_one_block_and_shared_kv():
    cfg = make_config("baseline", {"model.num_cls_tokens": 4, "model.class_attn_depth": 1})
    assert count_params(build_model(cfg.model)) == 3_929_674
    # a shared k/v latent saves one down-projection (192*64) per block against separate latents
    shared = count_params(build_model(make_config("baseline", ablation="mla-kv-shared").model))
    assert shared == 3_293_770 - 12 * 192 * 64


def test_baseline_flops():
    f = flops_per_image(build_model(make_config("baseline").model))
    assert 0.49e9 < f < 0.51e9  # 0.50 GFLOP forward (attention included), ~1.5 GFLOP per training image


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_every_ablation_forward_backward(ablation):
    torch.manual_seed(0)
    # what the smoke preset's 32 channels and 512 images need: a latent narrower than 32, more images than a batch
    d = ABLATIONS[ablation]
    fit = {**({"model.latent_dim": 16} if "model.latent" in d else {}),
           **({"data.subset": 0} if d.get("train.batch_size", 0) > 512 else {})}
    cfg = make_config("smoke", fit, ablation=ablation)
    model = build_model(cfg.model)
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, cfg.model.num_classes) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    if cfg.model.class_attn_depth and cfg.model.class_attn == "reference":
        # A finding, kept for parameter-count parity with reference §6.7: the reference projects the patches in the
        # last class-attention block too, but nothing reads them after it, so that projection never learns.
        last = f"cls_blocks.{cfg.model.class_attn_depth - 1}.attn.proj_patches."
        missing = [n for n in missing if not n.startswith(last)]
    assert not missing, f"{ablation}: no gradient for {missing}"


def test_sincos_values():
    D = 16
    t = sincos_pos_embed(8, 8, D, num_cls=2)
    assert t.shape == (2 + 64, D) and torch.all(t[:2] == 0)
    P = D // 4
    omega = [1 / 10000 ** (d / P) for d in range(P)]
    r, c = 3, 5
    row = t[2 + r * 8 + c]
    assert row[:P].tolist() == pytest.approx([math.sin(r * w) for w in omega], abs=1e-6)
    assert row[P : 2 * P].tolist() == pytest.approx([math.cos(r * w) for w in omega], abs=1e-6)
    assert row[2 * P : 3 * P].tolist() == pytest.approx([math.sin(c * w) for w in omega], abs=1e-6)
    assert row[3 * P :].tolist() == pytest.approx([math.cos(c * w) for w in omega], abs=1e-6)
    assert sincos_pos_embed(4, 6, 8).shape == (24, 8)  # any grid


def test_sincos_with_several_cls_tokens_is_fixed():
    cfg = make_config("smoke", {"model.pos_embed": "sincos", "model.num_cls_tokens": 4})
    model = build_model(cfg.model)
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_drop_path_schedule_continues_over_class_attention_blocks():
    cfg = make_config("baseline", {"model.depth": 3, "model.class_attn_depth": 2, "model.drop_path": 0.4})
    model = build_model(cfg.model)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in list(model.blocks) + list(model.cls_blocks)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_cait_class_attention_leaves_patches_unchanged():
    cfg = make_config("smoke", {"model.num_cls_tokens": 2, "model.class_attn_depth": 1,
                                "model.class_attn": "cait", "model.drop_path": 0.0})
    model = build_model(cfg.model).eval()
    x = torch.randn(2, 2 + 64, cfg.model.embed_dim)
    y = model.cls_blocks[0](x)
    assert torch.equal(y[:, 2:], x[:, 2:]) and not torch.equal(y[:, :2], x[:, :2])


# ---- no CLS token: global average pooling


def test_gap_reads_the_mean_of_the_normalised_patch_tokens():
    model = seeded_vit(**{"model.num_cls_tokens": 0}).eval()
    assert model.cls_token is None and model.pos_embed.shape[1] == 64
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = model.tokens(x)
        assert t.shape == (3, 64, 32)
        for blk in model.blocks:
            t = blk(t)
        expected = model.head(model.norm(t).mean(1))
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="class_attn_depth needs CLS tokens"):
        make_config("smoke", {"model.num_cls_tokens": 0, "model.class_attn_depth": 1})
    with pytest.raises(ConfigError, match="num_cls_tokens must be >= 0"):
        make_config("smoke", {"model.num_cls_tokens": -1})


# ---- patch dropout


def test_patch_dropout_keeps_a_random_subset_in_training_only():
    seen = []
    model = seeded_vit(**{"model.patch_drop": 0.5})
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    torch.manual_seed(2)
    c = model(x)
    assert seen == [1 + 32] * 3  # the CLS token and half of the 64 patches
    assert torch.equal(a, b) and not torch.equal(a, c)  # a function of the global seed (train.py: of the step)
    full = seeded_vit()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), full.eval()(x), atol=0, rtol=0)
    assert seen[-1] == 65
    with pytest.raises(ConfigError, match="patch_drop must be in"):
        make_config("smoke", {"model.patch_drop": 1.0})
    with pytest.raises(ConfigError, match="patch_drop.*not supported by model.arch=swin"):
        make_config("smoke", {"model.arch": "swin", "model.patch_drop": 0.25})


# ---- the CPU attention (model.CpuAttention): torch's scaled_dot_product_attention's result, faster at these sizes


def test_cpu_attention_equals_sdpa_forward_and_backward():
    import torch.nn.functional as F

    from smallvit.model import CpuAttention, sdpa_attention

    torch.manual_seed(0)
    B, N, H, d = 3, 9, 2, 4
    qkv = torch.randn(B, N, 3 * H * d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: CpuAttention.apply(t, H), (qkv,))

    def sdpa(t):  # the reference: torch's attention on the heads, by hand; the GPU's path is sdpa_attention
        q, k, v = t.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * d)

    torch.testing.assert_close(sdpa_attention(qkv, H), sdpa(qkv), atol=0, rtol=0)
    g = torch.randn(B, N, H * d, dtype=torch.float64)
    ours, = torch.autograd.grad(CpuAttention.apply(qkv, H), qkv, g)
    theirs, = torch.autograd.grad(sdpa(qkv), qkv, g)
    torch.testing.assert_close(CpuAttention.apply(qkv, H), sdpa(qkv), atol=1e-12, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls_tokens", [1, 0])
def test_training_step_equals_timms_vit_under_the_weight_map(cls_tokens):
    """Logits and every parameter's gradient equal timm's VisionTransformer (its fused attention) loaded with the
    same weights: the CPU attention and the fused q/k/v product change the speed, not the model."""
    from smallvit.export import to_timm

    model = seeded_vit(**{"model.num_cls_tokens": cls_tokens, "model.drop_path": 0.0}).train()
    tm = to_timm(model).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.functional.cross_entropy(tm(x), y).backward()
    torch.testing.assert_close(model(x), tm(x), atol=1e-5, rtol=0)
    ours, theirs = model.blocks[0].attn, tm.blocks[0].attn
    fused = torch.cat([ours.q.weight.grad, ours.k.weight.grad, ours.v.weight.grad])
    torch.testing.assert_close(fused, theirs.qkv.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.patch_embed.weight.grad, tm.patch_embed.proj.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.head.weight.grad, tm.head.weight.grad, atol=1e-5, rtol=1e-4)
