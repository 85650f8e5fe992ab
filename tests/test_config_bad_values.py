"""Every config key refuses its bad values before anything is read or written (issue 23, item 3).

The property test walks every leaf key of config.VALID_KEYS, draws invalid values (wrong type, out of range, a bad
choice) and runs the real CLI entry in this process: exit 2, one line on stderr naming the key, nothing on stdout,
no --out folder. A key added without an entry in RANGE, TYPE_ONLY or FREE_TEXT fails test_every_key_has_bad_values,
and an entry whose values the config accepts fails the property test, so no key goes unchecked.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smallvit.cli import main
from smallvit.config import SEED_LIMIT, VALID_KEYS, WANDB_FORBIDDEN, key_choices
from smallvit.datasets import DATASETS
from smallvit.experiments import make_config

# the modules (smallvit's package namespace exports the functions train and pretrain under the same names)
T, P = importlib.import_module("smallvit.train"), importlib.import_module("smallvit.pretrain")
REPO = Path(__file__).resolve().parents[1]
SMOKE = make_config("smoke")  # the preset every example runs on: 32 px, 32 channels, 2 heads, 512 images, batch 64


def ints(lo=None, hi=None):
    return st.integers(min_value=lo, max_value=hi).map(str)


def floats(lo=None, hi=None, exclude=False):
    return st.floats(min_value=lo, max_value=hi, exclude_min=exclude and lo is not None,
                     exclude_max=exclude and hi is not None, allow_nan=False, allow_infinity=False).map(repr)


def pairs(bad, good, n=2):
    """Comma-separated n-tuples with at least one value from `bad` (others from `good`)."""
    return st.tuples(bad, st.lists(good, min_size=n - 1, max_size=n - 1), st.integers(0, n - 1)).map(
        lambda t: ",".join(t[1][: t[2]] + [t[0]] + t[1][t[2]:]))


def below(lo, integer=False, strict=True):
    """Values < lo (strict) or <= lo."""
    if integer:
        return ints(hi=lo - 1 if strict else lo)
    return floats(hi=lo, exclude=strict)


def outside(lo, hi, integer=False, lo_in=True, hi_in=True):
    """Values outside the interval [lo, hi] (each end included or not)."""
    if integer:
        return ints(hi=lo - 1) | ints(lo=hi + 1)
    return floats(hi=lo, exclude=lo_in) | floats(lo=hi, exclude=hi_in)


PROB = floats(0.0, 1.0)
SIZE = SMOKE.model.img_size
IMAGES = SMOKE.data.subset  # the smoke preset's training images
# Invalid values by range, choice or rule, as CLI strings, for every key whose type alone does not cover them.
RANGE: dict[str, st.SearchStrategy[str]] = {
    "model.img_size": ints().filter(lambda v: int(v) != DATASETS["cifar10"].image_size),  # CIFAR-10 is not resized
    "model.patch_size": ints().filter(lambda v: int(v) <= 0 or SIZE % int(v) != 0),
    "model.in_chans": ints().filter(lambda v: int(v) != 3),
    "model.num_classes": ints().filter(lambda v: int(v) not in (0, 10)),
    "model.embed_dim": below(1, True) | ints(1, 10_000).filter(lambda v: int(v) % SMOKE.model.num_heads != 0),
    "model.depth": below(1, True),
    "model.num_heads": below(1, True) | ints(1, 10_000).filter(lambda v: SMOKE.model.embed_dim % int(v) != 0),
    "model.mlp_ratio": below(0, strict=False),
    "model.norm_eps": below(0, strict=False),
    "model.drop_path": outside(0, 1, hi_in=False),
    "model.latent": st.text(min_size=1).filter(lambda s: not set(s) <= set("qkv") or len(set(s)) < len(s)),
    "model.latent_dim": below(1, True) | ints(lo=SMOKE.model.embed_dim),
    "model.num_cls_tokens": below(0, True),
    "model.class_attn_depth": below(0, True),
    "model.whiten_images": below(1, True),
    "model.swin_depths": pairs(ints(hi=0), ints(1, 4), 3),
    "model.swin_heads": pairs(ints(hi=0), ints(1, 4), 3) | st.just("1,2"),
    "model.window_size": below(1, True),
    "model.layer_scale_init": below(0, strict=False),
    "model.patch_drop": outside(0, 1, hi_in=False),
    "data.subset": below(0, True),
    "data.test_subset": below(0, True),
    "data.val_images": below(0, True) | ints(lo=IMAGES),
    "data.val_seed": below(0, True) | ints(lo=SEED_LIMIT),
    "aug.crop_pad": below(0, True),
    "aug.randaugment_ops": below(1, True),
    "aug.randaugment_magnitude": outside(0, 30, integer=True),
    "aug.erase_p": outside(0, 1),
    "aug.erase_area": pairs(outside(0, 1, lo_in=False, hi_in=False), PROB) | st.just("0.5,0.1") | st.just("0.1"),
    "aug.erase_min_aspect": outside(0, 1, lo_in=False),
    "aug.mix_p": outside(0, 1),
    "aug.mixup_alpha": below(0, strict=False),
    "aug.cutmix_beta": below(0, strict=False),
    "aug.repeats": below(1, True),
    "aug.chunk_images": below(0, True),
    "optim.lr": below(0, strict=False),
    "optim.min_lr": outside(0, SMOKE.optim.lr),
    "optim.weight_decay": below(0),
    "optim.betas": pairs(outside(0, 1, hi_in=False), floats(0, 0.999)) | st.just("0.9,0.99,0.999"),
    "optim.eps": below(0, strict=False),
    "optim.warmup_epochs": below(0, True) | ints(lo=SMOKE.train.epochs),
    "optim.decay_fraction": outside(0, 1, lo_in=False),
    "optim.muon_lr": below(0, strict=False),
    "optim.muon_momentum": outside(0, 1, hi_in=False),
    "optim.muon_weight_decay": below(0),
    "optim.grad_clip": below(0),
    "train.epochs": below(1, True),
    "train.batch_size": below(1, True) | ints(lo=IMAGES + 1),
    "train.label_smoothing": outside(0, 1, hi_in=False),
    "train.eval_every_epochs": below(0, True),
    "train.ema_decay": outside(0, 1, hi_in=False),
    "train.res_schedule": st.sampled_from(["abc", "16", "16:0", "16:1.5", "64:0.5", "18:0.5", "16:0.5,8:0.25",
                                           "16:0.5,24:0.5"]),
    "train.max_steps": below(0, True),
    "train.seed": below(0, True) | ints(lo=SEED_LIMIT),
    "train.device": st.sampled_from(["gpu", "cuda:x", "cuda:", "CPU", "mps", "cuda:0,1", ""]) | st.text().filter(
        lambda s: s not in ("auto", "cpu", "cuda") and not (s.startswith("cuda:") and s[5:].isdigit())),
    "train.threads": below(0, True),
    "train.log_every_steps": below(1, True),
    "train.checkpoint_every_steps": below(0, True),
    "train.checkpoint_every_seconds": below(0),
    "train.time_budget_s": below(0),
    "train.init_from": st.text("abcxyz_-", min_size=1).map(lambda s: f"/nonexistent-{s}/checkpoint.pt"),
    "train.wandb_project": st.tuples(st.text(), st.sampled_from(WANDB_FORBIDDEN)).map(lambda t: t[0] + t[1]),
    # W&B is off without a project, so these would be ignored: refused instead
    "train.wandb_entity": st.text(min_size=1),
    "train.wandb_name": st.text(min_size=1),
    "train.wandb_tags": st.text(min_size=1),
    **{f"ssl.{k}": below(1, True) for k in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers",
                                            "knn_k")},
    "ssl.global_crops": below(2, True),
    **{f"ssl.{k}": outside(0, 1) for k in ("momentum_teacher", "center_momentum", "jitter_p", "grey_p",
                                           "solarize_p")},
    **{f"ssl.{k}": below(0, strict=False) for k in ("warmup_teacher_temp", "teacher_temp", "student_temp",
                                                    "knn_temp")},
    **{f"ssl.{k}": below(0, True) for k in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs",
                                            "local_crops", "local_size", "knn_train_images")},
    "ssl.weight_decay_end": below(0),
    "ssl.clip_grad": below(0),
    "ssl.global_scale": pairs(outside(0, 1, lo_in=False), PROB) | st.just("0.9,0.5"),
    "ssl.local_scale": pairs(outside(0, 1, lo_in=False), PROB) | st.just("0.9,0.5"),
    "ssl.jitter": pairs(below(0), PROB, 4) | st.just("0.4,0.4,0.2,0.6"),
    "ssl.blur_p": pairs(outside(0, 1), PROB, 3),
    "ssl.blur_sigma": pairs(below(0, strict=False), floats(0.1, 2.0)) | st.just("2.0,0.1"),
}
# Keys whose type says everything (true/false, or a fixed set of choices): the type-derived values below suffice.
TYPE_ONLY = {k for k, t in VALID_KEYS.items() if t is bool or key_choices(k)}
# Keys with no invalid value a config can know of, and who checks them instead.
FREE_TEXT = {"data.data_dir": "any folder; data.py names it in one line when the dataset is not there"}
# Other keys a check needs set to be reached (otherwise model.arch=vit refuses any swin key, unread, by name).
CONTEXT = {
    **dict.fromkeys(("model.swin_depths", "model.swin_heads", "model.window_size"),
                    ["model.arch=swin", "model.swin_heads=1,2,4"]),
    "model.layer_scale_init": ["model.arch=cait", "model.class_attn_depth=1"],
    "model.latent_dim": ["model.latent=q", "model.latent_dim=16"],
}


def wrong_type(key) -> st.SearchStrategy[str]:
    """Strings the key's type refuses: not a number, not a whole number, not true/false, not a choice."""
    t = VALID_KEYS[key]
    origin = typing.get_origin(t)
    if t is bool:
        return st.sampled_from(["maybe", "2", "-1", "", "none", "1.0"])
    if key_choices(key):
        return st.text().filter(lambda s: s.strip() not in key_choices(key))
    if t is int:
        return st.sampled_from(["x", "2.5", "1e-3", "true", "[1]", "NaN", ""])
    if t is float:
        return st.sampled_from(["x", "true", "NaN", "Infinity", "-Infinity", "[1]", ""])
    if origin is tuple:
        args = typing.get_args(t)
        if args[-1] is Ellipsis:
            return st.sampled_from(["", "x,y", "1.5"])
        return st.sampled_from(["x," * (len(args) - 1) + "x", ",".join(["0.5"] * (len(args) + 1))])
    return st.nothing()  # str: any text is a string; RANGE says what is wrong


def test_every_key_has_bad_values():
    """A new key needs its invalid values here (and so its check in config.validate) before the suite passes."""
    missing = set(VALID_KEYS) - set(RANGE) - TYPE_ONLY - set(FREE_TEXT)
    assert not missing, f"add invalid values (and a check) for {sorted(missing)} to RANGE in this file"
    assert not set(RANGE) - set(VALID_KEYS) and not set(FREE_TEXT) - set(VALID_KEYS)
    assert not set(RANGE) & set(FREE_TEXT)


def run_cli(sets: list[str], command: str = "train") -> tuple[object, list[str], str, bool]:
    """(exit code, stderr lines, stdout, whether --out exists) of `smallvit COMMAND --preset smoke --set ...`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = [command, "--preset", "smoke", "--out", str(out), "--data-dir", str(Path(tmp) / "no-data"),
                "--set", "data.download=false", *sets]
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code
        return code, err.getvalue().splitlines(), std.getvalue(), out.exists()


class Reached(Exception):
    """Training was started: the value was accepted."""


@pytest.fixture
def no_training(monkeypatch):
    def stop(*args, **kwargs):
        raise Reached("the config was accepted and training started")

    monkeypatch.setattr(T, "train", stop)
    monkeypatch.setattr(P, "pretrain", stop)


@pytest.mark.parametrize("key", sorted(set(VALID_KEYS) - set(FREE_TEXT)))
@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(data=st.data())
def test_bad_value_is_one_line_exit_2_and_nothing_written(no_training, key, data):
    strategy = wrong_type(key)
    if key in RANGE:
        strategy = strategy | RANGE[key]
    value = data.draw(strategy, label=key)
    # ssl.* through pretrain: train refuses any ssl.* value as unread, which would hide a missing range check
    command = "pretrain" if key.startswith("ssl.") else "train"
    code, err, out, written = run_cli([*CONTEXT.get(key, []), f"{key}={value}"], command)
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith(f"smallvit {command}: error: ") and key in err[0], err
    assert not out and not written


def test_context_alone_is_valid(no_training):
    """Each CONTEXT is a valid config, so the key under test is what is refused."""
    for sets in {tuple(c) for c in CONTEXT.values()}:
        with pytest.raises(Reached):
            run_cli(list(sets))


def test_commands_refuse_keys_they_do_not_read(no_training):
    code, err, _, written = run_cli(["ssl.out_dim=64"])
    assert (code, len(err), written) == (2, 1, False) and "ssl.out_dim=64: not read by `smallvit train`" in err[0]
    code, err, _, written = run_cli(["aug.mixup=false", "train.ema_decay=0.9"], "pretrain")
    assert (code, len(err), written) == (2, 1, False)
    assert "aug.mixup=False, train.ema_decay=0.9: not read by `smallvit pretrain`" in err[0]
    code, err, _, written = run_cli(["ssl.out_dim=64"], "profile")
    assert code == 2 and "ssl.out_dim" in err[0]
    # what the command reads is accepted; so is a preset's value for another command (quick's aug.*), and a key
    # set back to its preset value
    for command, sets in [("train", ["aug.mixup=false"]), ("pretrain", ["ssl.out_dim=64", "aug.repeats=2"]),
                          ("train", ["ssl.out_dim=1024"])]:
        with pytest.raises(Reached):
            run_cli(sets, command)
    with pytest.raises(Reached), contextlib.redirect_stdout(io.StringIO()):
        main(["pretrain", "--preset", "quick", "--out", "/nonexistent/x"])


def test_ablate_refuses_unread_keys_before_planning(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["ablate", "patch", "--preset", "smoke", "--root", str(tmp_path / "s"), "--set", "ssl.knn_k=5"])
    assert code == 2 and "ssl.knn_k=5: not read by `smallvit ablate`" in err.getvalue()
    assert not (tmp_path / "s").exists()


def test_an_override_settles_a_rule_between_preset_and_ablation():
    """make_config validates preset + ablation + overrides as a whole: smoke's 32 channels and mla-q's default
    latent_dim conflict, and model.latent_dim settles it."""
    with pytest.raises(Exception, match="latent_dim=64 must be smaller than model.embed_dim=32"):
        make_config("smoke", ablation="mla-q")
    assert make_config("smoke", {"model.latent_dim": 16}, ablation="mla-q").model.latent == "q"


@pytest.mark.parametrize("preset", ["tinyimagenet", "cinic10", "cifar100", "svhn", "swin", "cait", "speedrun",
                                    "speedrun-gpu", "pretrain", "finetune", "quick", "mini", "baseline"])
def test_presets_stay_valid(preset):
    make_config(preset)


def _script():
    spec = importlib.util.spec_from_file_location("bad_config_values", REPO / "scripts" / "bad_config_values.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_bad_values(tmp_path):
    """docs/reliability.md's table (scripts/bad_config_values.py), the issue's 18 values first: each is one line
    naming one of its keys, exit 2, no --out, and no data is read (the data folder does not exist)."""
    script = _script()
    for sets in script.CASES:
        r = script.run_case(sets, str(tmp_path / "no-data"), steps=2)
        assert (r["code"], r["lines"], r["written"]) == (2, 1, False), r
        assert any(s.split("=")[0] in r["last"] for s in sets), r
