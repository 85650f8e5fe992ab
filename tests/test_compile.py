"""The torch.compile and bf16-autocast paths of train(), and where the training loop waits for the device (CPU)."""

from __future__ import annotations

import importlib
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import smoke_config
from smallvit import train
from smallvit.config import ConfigError
from smallvit.runs import read_metrics

T = importlib.import_module("smallvit.train")  # the module: `import smallvit.train` gives the re-exported function


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()  # compiled graphs hold the test's model; do not let them pile up across tests


@pytest.mark.slow  # about 40 s on 2 CPU cores with a cold inductor cache, 3 s warm
def test_compiled_run_matches_eager(fake_cifar, tmp_path):
    kw = {"train.max_steps": 3, "train.log_every_steps": 1, "data.test_subset": 64}
    eager = train(smoke_config(fake_cifar, **kw), tmp_path / "eager")
    comp = train(smoke_config(fake_cifar, **kw, **{"train.compile": True}), tmp_path / "compiled")
    assert comp["status"] == "stopped_at_max_steps" and comp["step"] == 3
    assert comp["first_step_seconds"] > eager["first_step_seconds"] > 0  # compilation is reported, not timed
    le, lc = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(lc) == 3 and all(math.isfinite(v) for v in lc)
    assert lc == pytest.approx(le, rel=1e-3)  # the same steps: inductor only reorders floating-point sums
    assert comp["final_test_acc"] == pytest.approx(eager["final_test_acc"], abs=100 / 64 + 1e-9)  # <= 1 image


def test_bf16_autocast_on_cpu(fake_cifar, tmp_path):
    kw = {"train.max_steps": 2, "train.log_every_steps": 1, "data.test_subset": 64}
    fp32 = train(smoke_config(fake_cifar, **kw, **{"train.precision": "fp32"}), tmp_path / "fp32")
    bf16 = train(smoke_config(fake_cifar, **kw, **{"train.precision": "bf16"}), tmp_path / "bf16")
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    l32, l16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert all(math.isfinite(v) for v in l16) and math.isfinite(bf16["final_test_acc"])
    assert l16[0] != l32[0]  # autocast really ran in bf16 ...
    assert l16[0] == pytest.approx(l32[0], rel=0.02)  # ... and step 0 (same data, same init) agrees to bf16 precision


# Tensor methods that copy a value to the host, i.e. wait for the device on CUDA.
SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def _count_host_syncs(monkeypatch) -> Counter:
    """Count syncing Tensor calls by the (file, function) that made them."""
    calls: Counter = Counter()
    for name in SYNCING:
        orig = getattr(torch.Tensor, name)

        def counted(self, *args, _orig=orig, **kwargs):
            caller = sys._getframe(1).f_code
            calls[(Path(caller.co_filename).name, caller.co_name)] += 1
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _run_for_syncs(fake_cifar, tmp_path, monkeypatch) -> tuple[Counter, int]:
    # 2 epochs of 9 steps; one log, one evaluation and one checkpoint, all at the last step.
    cfg = smoke_config(fake_cifar, **{"train.epochs": 2, "train.eval_every_epochs": 0, "train.log_every_steps": 1000,
                                      "data.test_subset": 64})
    calls = _count_host_syncs(monkeypatch)
    result = train(cfg, tmp_path / "run")
    return calls, result["step"]


def test_loop_syncs_only_at_log_and_eval_points(fake_cifar, tmp_path, monkeypatch):
    calls, steps = _run_for_syncs(fake_cifar, tmp_path, monkeypatch)
    assert steps == 18
    by_file = Counter()
    for (file, _), n in calls.items():
        by_file[file] += n
    # The CPU policy (deliberate): the loss is checked for NaN/inf every step, through any_rank.
    assert calls[("distributed.py", "any_rank")] == steps
    # the loop's own code: train.py and the run-lifecycle helpers it calls (lifecycle.py)
    loop = (by_file["train.py"] + by_file["lifecycle.py"] + by_file["distributed.py"]
            - calls[("distributed.py", "any_rank")])
    assert loop <= 8, calls  # log stats, evaluation, the checkpoint's finite check: a constant, not per step
    assert by_file["autoaugment.py"] <= steps, calls  # its documented one sync per batch (op counts to the host)
    assert by_file["augment.py"] + by_file["model.py"] + by_file["optim.py"] == 0, calls


def test_cuda_policy_has_no_per_step_sync(fake_cifar, tmp_path, monkeypatch):
    """With the GPU policy (check at log points only), no step of the loop itself waits for the device."""
    monkeypatch.setattr(T, "check_each_step", lambda device, on_nonfinite: False)
    calls, steps = _run_for_syncs(fake_cifar, tmp_path, monkeypatch)
    assert calls[("distributed.py", "any_rank")] == 0
    loop_files = ("train.py", "lifecycle.py", "distributed.py")
    assert sum(n for (file, _), n in calls.items() if file in loop_files) <= 8, calls


@pytest.mark.parametrize("mode, expected", [("default", None), ("reduce-overhead", "reduce-overhead")])
def test_compile_mode_reaches_torch_compile(fake_cifar, tmp_path, monkeypatch, mode, expected):
    """train.compile_mode is passed to torch.compile (reduce-overhead = CUDA graphs on a GPU); bad modes are refused."""
    seen = []

    def fake_compile(model, mode=None):
        seen.append(mode)
        return model

    monkeypatch.setattr(T.torch, "compile", fake_compile)
    train(smoke_config(fake_cifar, **{"train.max_steps": 1, "train.compile": True, "train.compile_mode": mode,
                                      "data.test_subset": 64}), tmp_path / "r")
    assert seen == [expected]
    with pytest.raises(ConfigError, match="train.compile_mode must be one of default, reduce-overhead"):
        smoke_config(fake_cifar, **{"train.compile_mode": "fast"})
