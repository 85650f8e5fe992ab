"""DINO pre-training (pretrain.py) on tiny runs: the loss, the centre, the schedules, the teacher, resume, and the
parent project's recipe point by point."""

import json
import math
import os
import signal
from dataclasses import replace

import pytest
import torch

from conftest import MEAN, REAL_DATA, SSL, STD, needs_real_cifar, smoke_config
from smallvit import pretrain as P
from smallvit.cli import main
from smallvit.config import SSLConfig
from smallvit.experiments import make_config
from smallvit.multicrop import MultiCrop
from smallvit.optim import build_optimizer, resolve_lr
from smallvit.runs import load_checkpoint, read_metrics


def ssl_config(data_dir, **overrides):
    """The smoke preset with a light multi-crop (2 local views) for speed; the DINO objective is unchanged."""
    base = {"ssl.local_crops": 2, "ssl.out_dim": 256, "optim.weight_decay": 0.04, "optim.decay_all": False}
    base.update(overrides)
    return smoke_config(data_dir, **base)


def test_dino_loss_pairs_every_teacher_view_with_the_other_views():
    torch.manual_seed(0)
    B, K, n_views = 4, 16, 5
    student, teacher, center = torch.randn(n_views * B, K), torch.randn(2 * B, K), torch.randn(1, K)
    loss, q = P.dino_loss(student, teacher, center, 0.1, 0.04, 2)
    s = [torch.log_softmax(v / 0.1, -1) for v in student.chunk(n_views)]
    t = [torch.softmax((v - center) / 0.04, -1) for v in teacher.chunk(2)]
    terms = [-(t[i] * s[j]).sum(-1).mean() for i in range(2) for j in range(n_views) if i != j]
    assert torch.allclose(loss, sum(terms) / len(terms)) and len(terms) == 2 * n_views - 2
    assert torch.allclose(q, torch.cat(t))


def test_centering_removes_a_dimension_that_dominates_every_output():
    """Without a centre a constant bias wins every image (collapse to one dimension); the running centre
    (momentum 0.9) subtracts it, and the teacher's outputs spread again."""
    torch.manual_seed(0)
    out = torch.randn(64, 32)
    out[:, 3] += 5.0  # every output points at dimension 3
    center = torch.zeros(1, 32)
    h0 = P.teacher_stats(P.dino_loss(out, out, center, 0.1, 0.04, 2)[1])
    for _ in range(60):
        P.update_center(center, out, 0.9, world=1)
    assert torch.allclose(center, 0.0 + (1 - 0.9**60) * out.mean(0, keepdim=True), atol=1e-5)
    h1 = P.teacher_stats(P.dino_loss(out, out, center, 0.1, 0.04, 2)[1])
    assert h0[1] < 0.5 and h1[1] > 2.5  # the entropy of the mean teacher distribution, in nats


def test_teacher_temperature_and_momentum_schedules():
    s = SSLConfig()
    temps = [P.teacher_temperature(e, s) for e in range(12)]
    assert temps[0] == 0.04 and math.isclose(temps[9], 0.07) and temps[10:] == [0.07, 0.07]
    assert all(a < b for a, b in zip(temps[:10], temps[1:10]))


@pytest.mark.parametrize("variant", [{}, {"model.latent": "qkv", "model.latent_dim": 16}, {"model.num_cls_tokens": 2,
                                                                     "model.class_attn_depth": 1},
                                     {"model.pos_embed": "sincos", "model.num_cls_tokens": 2,
                                      "model.cls_pool": "mean"}])
def test_every_vit_variant_can_be_pretrained(variant):
    cfg = make_config("smoke", {**variant, "ssl.out_dim": 64})
    net = P.DINO(cfg)
    views = MultiCrop(cfg.ssl, 32, MEAN, STD, torch.device("cpu")).views(
        torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), 0)
    out = net(views)
    assert out.shape == (10 * 3, 64)
    P.dino_loss(out, out[:6].detach(), torch.zeros(1, 64), 0.1, 0.04, 2)[0].backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen == ["head.last_layer.parametrizations.weight.original0"]  # norm_last_layer: g fixed at 1


@pytest.mark.slow
def test_teacher_is_the_ema_of_the_student(fake_cifar, tmp_path):
    cfg = ssl_config(fake_cifar, **{"train.max_steps": 1})
    P.pretrain(cfg, tmp_path / "r")
    one = load_checkpoint(tmp_path / "r")
    torch.manual_seed(cfg.train.seed)
    init = P.DINO(cfg).state_dict()  # the student (and teacher) at step 0
    P.pretrain(ssl_config(fake_cifar, **{"train.max_steps": 2}), tmp_path / "r", resume=True)
    two = load_checkpoint(tmp_path / "r")
    total = (600 // 64) * cfg.train.epochs
    for step, before, after in ((0, init, one), (1, one["teacher"], two)):
        m = 1 - (1 - cfg.ssl.momentum_teacher) * (1 + math.cos(math.pi * step / total)) / 2
        for k, v in after["teacher"].items():
            expect = m * before[k] + (1 - m) * after["student"][k]
            assert torch.allclose(v, expect, atol=1e-6), k
    assert not torch.equal(two["teacher"]["backbone.blocks.0.mlp.fc1.weight"],
                           two["student"]["backbone.blocks.0.mlp.fc1.weight"])
    assert all(torch.equal(two["model"][k], two["teacher"]["backbone." + k]) for k in two["model"])


@pytest.mark.slow
def test_pretrain_records_and_loss_falls(fake_cifar, tmp_path):
    """The loss is the teacher's entropy plus KL(teacher || student). Early in a run the entropy rises (the centre
    catches up with the outputs' common part, the teacher temperature warms up), so the part the student controls,
    the KL, is what must fall (even with a frozen teacher and a fixed temperature the entropy rises at first)."""
    cfg = ssl_config(fake_cifar, **{"train.epochs": 8, "optim.lr": 2e-3, "train.log_every_steps": 3})
    r = P.pretrain(cfg, tmp_path / "run")
    rows = [x for x in read_metrics(tmp_path / "run") if "loss" in x]
    kl = [x["student_kl"] for x in rows]
    assert r["status"] == "done" and r["step"] == 8 * 9
    assert sum(kl[-4:]) / 4 < 0.6 * sum(kl[:4]) / 4, kl
    assert all(abs(x["loss"] - x["teacher_entropy"] - x["student_kl"]) < 1e-4 for x in rows)
    knn = [x for x in read_metrics(tmp_path / "run") if "knn_acc" in x]
    assert [x["step"] for x in knn] == [0] + [9 * e for e in range(1, 9)]  # random init, then every epoch
    for key in ("teacher_entropy", "teacher_mi", "center_norm", "center_drift", "momentum", "teacher_temp"):
        assert all(math.isfinite(x[key]) for x in rows), key
    assert (tmp_path / "run" / "tb").is_dir()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["final_knn_acc"] == r["final_knn_acc"]


@pytest.mark.slow
def test_resume_and_sigterm_equal_the_uninterrupted_run(fake_cifar, tmp_path, monkeypatch):
    cfg = ssl_config(fake_cifar)
    P.pretrain(cfg, tmp_path / "full")
    views = MultiCrop.views

    def views_then_sigterm(self, x, key):  # a scheduler's SIGTERM arriving during step 6
        if key == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return views(self, x, key)

    monkeypatch.setattr(MultiCrop, "views", views_then_sigterm)
    r1 = P.pretrain(cfg, tmp_path / "resumed")
    assert r1["status"] == "interrupted" and r1["step"] == 7
    monkeypatch.setattr(MultiCrop, "views", views)
    r2 = P.pretrain(cfg, tmp_path / "resumed", resume=True)
    assert r2["status"] == "done"
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "resumed")
    for part in ("teacher", "student"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(a["center"], b["center"])
    timing = ("img_per_s", "train_seconds", "wall_seconds")
    strip = lambda rows: [{k: v for k, v in x.items() if k not in timing} for x in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(tmp_path / "resumed"))


@pytest.mark.slow
def test_cli_pretrain_then_knn_on_both_kinds_of_run(fake_cifar, tmp_path, capsys):
    common = ["--preset", "smoke", "--set", f"data.data_dir={fake_cifar}", "data.download=false", "data.subset=0",
              "data.test_subset=0", "train.threads=1", "train.max_steps=3", "ssl.local_crops=1", "ssl.out_dim=64"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "p")]) == 0
    assert "k-NN accuracy" in capsys.readouterr().out
    assert main(["knn", str(tmp_path / "p"), "--test-images", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backbone"] == "teacher" and report["test_images"] == 100 and 0 <= report["knn_acc"] <= 100
    assert main(["train", *common[:-2], "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main(["knn", str(tmp_path / "t"), "--k", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backbone"] == "model" and report["k"] == 5
    assert main(["pretrain", *common, "optim.grad_clip=1", "--out", str(tmp_path / "q")]) == 2
    assert "ssl.clip_grad" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_starts_from_the_teacher_backbone(fake_cifar, tmp_path):
    from smallvit import train

    P.pretrain(ssl_config(fake_cifar, **{"train.max_steps": 3}), tmp_path / "p")
    teacher = load_checkpoint(tmp_path / "p")["teacher"]
    # lr 0 at step 0 (warm-up from min_lr = 0): one step leaves the loaded weights as they were
    train(smoke_config(fake_cifar, **{"train.init_from": str(tmp_path / "p"), "train.max_steps": 1,
                                      "optim.min_lr": 0.0}), tmp_path / "f")
    model = load_checkpoint(tmp_path / "f")["model"]
    body = [k for k in model if not k.startswith("head.")]
    assert body and all(torch.equal(model[k], teacher["backbone." + k]) for k in body)


@pytest.mark.slow
@needs_real_cifar
def test_no_collapse_on_real_images_and_the_monitor_sees_one(tmp_path):
    """A tiny pre-training on 1024 real CIFAR-10 training images: the teacher's outputs neither collapse to one
    dimension (entropy -> 0) nor to uniform (entropy -> log K, the view/output mutual information -> 0). A teacher
    softer than the student (temperature 0.2 > 0.1: centring without sharpening) collapses to uniform, and the
    monitor shows it. The healthy run's teacher temperature, 0.02, suits this 32-wide network: with the reference
    0.04 -> 0.07 its outputs are nearly uniform in so short a run (measured: mutual information 0.05 nats)."""
    log_k, runs = math.log(256), {}
    for name, temp in (("healthy", 0.02), ("collapsed", 0.2)):
        cfg = ssl_config(REAL_DATA, **{"data.subset": 1024, "data.test_subset": 200, "train.epochs": 3,
                                       "optim.lr": 2e-3, "ssl.momentum_teacher": 0.99, "train.log_every_steps": 4,
                                       "ssl.warmup_teacher_temp": temp, "ssl.teacher_temp": temp})
        P.pretrain(cfg, tmp_path / name)
        rows = [x for x in read_metrics(tmp_path / name) if "teacher_entropy" in x]
        runs[name] = rows[len(rows) // 2 :]
    for x in runs["healthy"]:
        assert 1.0 < x["teacher_entropy"] < log_k - 0.5 and x["teacher_mi"] > 0.2, x
    for x in runs["collapsed"]:
        assert x["teacher_entropy"] > log_k - 0.05 and x["teacher_mi"] < 0.02, x


@pytest.mark.parametrize("setting, message", [("ssl.global_scale=0.8,0.5", "ssl.global_scale"),
                                              ("ssl.local_size=6", "multiple of model.patch_size"),
                                              ("ssl.global_crops=1", "ssl.global_crops"),
                                              ("ssl.blur_p=0.5,1.5,0", "probabilities")])
def test_bad_ssl_settings_are_one_clear_error(setting, message):
    from smallvit.config import ConfigError, parse_overrides

    with pytest.raises(ConfigError, match=message):
        make_config("pretrain", parse_overrides([setting]))


def test_pretrain_and_finetune_presets_are_the_parent_projects_recipe():
    p, f = make_config("pretrain"), make_config("finetune")
    assert (p.model.embed_dim, p.model.depth, p.model.num_heads, p.model.patch_size) == (192, 9, 12, 4)
    assert (p.train.epochs, p.train.batch_size, p.optim.lr, p.optim.warmup_epochs) == (200, 512, 1e-4, 30)
    assert p.model.drop_path == 0.1 and p.ssl.clip_grad == 3.0  # train_ssl.py --drop_path_rate, --clip_grad
    assert (p.ssl.out_dim, p.ssl.local_crops, p.ssl.global_scale, p.ssl.local_scale) == (1024, 8, (0.7, 1.0),
                                                                                         (0.2, 0.5))
    # the same network (pos_interp only acts at another resolution, which fine-tuning never sees)
    assert replace(f.model, pos_interp="dino") == p.model and f.train.epochs == 100 and f.train.batch_size == 256


# ---- the parent's DINO recipe, point by point (vits-for-small-scale-datasets at 43a7493; docs/pretrain.md table)


def test_lr_is_per_256_images_as_the_parent_and_absolute_elsewhere(capsys):
    from smallvit.optim import param_groups, resolve_lr

    p = make_config("pretrain")
    # train_ssl.py line 320: args.lr * batch_size_per_gpu * world / 256, with lr 1e-4 and 2 GPUs x 256
    assert resolve_lr(p.optim, p.train.batch_size).lr == pytest.approx(1e-4 * (256 * 2) / 256)
    assert resolve_lr(p.optim, 128).lr == pytest.approx(5e-5)  # the rule, not a constant
    for preset in ("baseline", "finetune", "speedrun", "smoke"):  # every other preset: optim.lr is the peak
        o = make_config(preset).optim
        assert o.lr_scale == "absolute" and resolve_lr(o, 4096) == o
    with pytest.raises(ValueError, match="resolve_lr"):  # a per-256 rate is never read as absolute
        param_groups(torch.nn.Linear(2, 2), p.optim)
    assert main(["info", "--preset", "pretrain"]) == 0
    lr = json.loads(capsys.readouterr().out)["lr"]
    assert lr == {"optim.lr": 1e-4, "optim.lr_scale": "per256", "global_batch": 512, "peak_lr": pytest.approx(2e-4)}


def test_teacher_is_stochastic_as_the_parent_and_deterministic_as_dino():
    cfg = make_config("smoke", {"ssl.out_dim": 64, "model.drop_path": 0.1})
    views = MultiCrop(cfg.ssl, 32, MEAN, STD, torch.device("cpu")).views(
        torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), 0)[:1]
    assert make_config("pretrain").ssl.teacher_mode == "train"  # train_ssl.py 211-222: never put in eval mode
    outs = {}
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        teacher = P.make_teacher(P.DINO(cfg), replace(cfg.ssl, teacher_mode=mode)).module
        with torch.no_grad():
            outs[mode] = teacher(views), teacher(views)
        assert teacher.training == (mode == "train") and not any(p.requires_grad for p in teacher.parameters())
    assert not torch.equal(*outs["train"])  # drop path 0.1: two passes over the same views differ
    assert torch.equal(*outs["eval"])  # the original DINO's teacher (ssl.teacher_mode=eval)


def test_weight_decay_groups_are_the_parents_get_params_groups():
    from smallvit.optim import param_groups, resolve_lr

    p = make_config("pretrain")
    net = P.DINO(make_config("smoke", {"ssl.out_dim": 64}))
    names = {id(x): n for n, x in net.named_parameters()}
    groups = {g["kind"]: {names[id(x)] for x in g["params"]} for g in param_groups(net, resolve_lr(p.optim, 512))}
    # utils/utils_ssl.py line 623: not regularised = name ends with .bias or the tensor is 1-D; all else decays
    want = {n for n, x in net.named_parameters() if x.requires_grad and (n.endswith(".bias") or x.ndim == 1)}
    assert groups["no-decay"] == want
    assert {"backbone.cls_token", "backbone.pos_embed"} <= groups["decay"]
    default = param_groups(net, replace(p.optim, lr_scale="absolute", no_decay="1d-tokens"))  # smallvit's own rule
    assert "backbone.pos_embed" in {names[id(x)] for x in default[1]["params"]}


def test_fused_qkv_is_clipped_as_the_parents_one_qkv_tensor():
    torch.manual_seed(0)
    net = P.DINO(make_config("smoke", {"ssl.out_dim": 64}))
    for x in net.parameters():
        x.grad = torch.randn_like(x) * 3  # every tensor's norm far above the clip
    grads = {n: x.grad.clone() for n, x in net.named_parameters()}
    P.clip_per_tensor_(P.clip_tensors(net, fused_qkv=True), 3.0)
    for i in range(2):
        for kind in ("weight", "bias"):
            # the parent's models/vit.py line 76: one Linear(dim, 3 * dim) whose rows are q, k, v; clip_gradients
            # (utils_ssl.py 63-71) scales that tensor's gradient by clip / (norm + 1e-6)
            fused = torch.cat([grads[f"backbone.blocks.{i}.attn.{t}.{kind}"] for t in "qkv"])
            want = (fused * 3.0 / (fused.norm() + 1e-6)).chunk(3)
            got = [dict(net.named_parameters())[f"backbone.blocks.{i}.attn.{t}.{kind}"].grad for t in "qkv"]
            assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
            assert torch.cat(got).norm() == pytest.approx(3.0, rel=1e-5)
    fc1 = dict(net.named_parameters())["backbone.blocks.0.mlp.fc1.weight"].grad
    assert fc1.norm() == pytest.approx(3.0, rel=1e-5)  # every other tensor alone
    P.clip_per_tensor_(P.clip_tensors(net, fused_qkv=False), 1.0)  # DINO on separate q, k, v: each alone
    qkv = [dict(net.named_parameters())[f"backbone.blocks.0.attn.{t}.weight"].grad for t in "qkv"]
    assert torch.cat(qkv).norm() == pytest.approx(3**0.5, rel=1e-4)  # together sqrt(3) x the clip: 1.7x
    assert make_config("pretrain").ssl.clip_qkv == "fused"


def test_local_views_interpolate_positions_as_dino():
    """The parent's interpolate_pos_encoding (models/vit.py 178-198) samples output point i of the 4x4 local grid at
    (i + 0.5) * 8 / 4.1 - 0.5 of the 8x8 table (scale_factor (w0 + 0.1) / sqrt(N)); resampling to 4 samples at
    (i + 0.5) * 2 - 0.5. Each is checked against bicubic grid_sample at exactly those points."""
    import torch.nn.functional as F

    cfg = make_config("smoke", {"model.num_classes": 0, "model.embed_dim": 32})
    assert make_config("pretrain").model.pos_interp == "dino"
    torch.manual_seed(0)
    for mode, step in (("dino", 8 / 4.1), ("resample", 2.0)):
        net = P.build_model(replace(cfg.model, pos_interp=mode))
        with torch.no_grad():
            net.patch_embed.weight.zero_()
            net.patch_embed.bias.zero_()
            got = net.tokens(torch.zeros(1, 3, 16, 16))[0]  # (1 + 16, D): CLS, then the 4x4 grid
            assert torch.equal(got[0], (net.cls_token + net.pos_embed[:, 0])[0, 0])
            table = net.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)  # (1, D, 8, 8)
            at = (torch.arange(4) + 0.5) * step - 0.5  # source pixel coordinates
            norm = (2 * at + 1) / 8 - 1  # grid_sample's align_corners=False coordinates
            grid = torch.stack(torch.meshgrid(norm, norm, indexing="ij")[::-1], -1)[None]  # (1, 4, 4, (x, y))
            want = F.grid_sample(table, grid, mode="bicubic", padding_mode="border", align_corners=False)
        torch.testing.assert_close(got[1:], want[0].permute(1, 2, 0).reshape(16, -1), atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # the full grid needs no interpolation
            assert torch.equal(net.tokens(torch.zeros(1, 3, 32, 32))[0, 1:], net.pos_embed[0, 1:])


def test_lr_schedule_is_the_parents_cosine_scheduler():
    """utils/utils_ssl.py 223-233: np.linspace(0, base, warmup_iters), then final + (base - final) / 2 *
    (1 + cos(pi * i / len)). smallvit's warm-up (optim.warmup_from=zero) is linear from 0 to the peak at step W, the
    parent's reaches it at W - 1: at most 1/W of the peak apart during warm-up, equal after it."""
    import numpy as np

    from smallvit.optim import resolve_lr, schedule_factor

    o = resolve_lr(make_config("pretrain").optim, 512)
    spe, epochs, warm = 97, 200, 30  # 50,000 images / 512 per step, drop_last
    W, T = warm * spe, epochs * spe
    iters = np.arange(T - W)
    parent = np.concatenate([np.linspace(0, o.lr, W),
                             o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + np.cos(np.pi * iters / len(iters)))])
    ours = np.array([schedule_factor(s, T, W, o) * o.lr for s in range(T)])
    assert ours[0] == 0.0 and abs(ours[:W] - parent[:W]).max() <= 1.001 * o.lr / W
    assert np.allclose(ours[W:], parent[W:], rtol=1e-9, atol=1e-15)
    base = make_config("baseline").optim  # every other preset: the warm-up still starts at min_lr
    assert schedule_factor(0, 100, 10, base) * base.lr == pytest.approx(base.min_lr)


# ---- the weight-decay schedule's groups


@pytest.mark.slow
@pytest.mark.parametrize("fallback", ["adamw", "nadamw"])
def test_every_decayed_group_follows_the_weight_decay_schedule(fallback, cifar, tmp_path, one_thread):
    """Groups carry decay_scheduled (optim.param_groups); muon_fallback=nadamw once dropped its decayed group."""
    over = {"optim.name": "muon", "optim.muon_fallback": fallback, "optim.decay_all": False,
            "optim.weight_decay": 0.04, "ssl.weight_decay_end": 0.4}
    cfg = smoke_config(cifar, **{**SSL, **over})
    net = P.DINO(cfg)
    groups = build_optimizer(net, resolve_lr(cfg.optim, cfg.train.batch_size), torch.device("cpu")).param_groups
    flagged = {g["kind"] for g in groups if g["decay_scheduled"]}
    assert flagged == {fallback}  # the fallback's decayed group; not its no-decay group, not Muon's own decay
    P.pretrain(smoke_config(cifar, **{**SSL, **over, "train.max_steps": 3, "train.log_every_steps": 1}),
               tmp_path / "p")
    state = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    wd = [m["weight_decay"] for m in read_metrics(tmp_path / "p") if "weight_decay" in m]
    assert wd[0] == pytest.approx(0.04) and wd[-1] > wd[0]
    for g in state:
        if g["decay_scheduled"]:
            assert g["weight_decay"] == pytest.approx(wd[-1]), g["kind"]
        else:
            assert g["weight_decay"] in (0.0, cfg.optim.muon_weight_decay), g["kind"]
