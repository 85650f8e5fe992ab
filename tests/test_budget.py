"""train.time_budget_s (budget.py): the step count that fits a wall-time budget, decided once and kept on resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import smoke_config, write_fake_cifar10
from smallvit import budget
from smallvit.config import ConfigError
from smallvit.experiments import make_config
from smallvit.runs import load_checkpoint
from smallvit.train import train


def test_decide_pays_for_steps_evaluations_the_final_test_and_a_margin():
    d = budget.decide(budget_s=600, elapsed_s=20, step=30, step_s=0.1, eval_s=2.0, final_s=4.0,
                      evals_per_step=1 / 390, max_steps=100_000, steps_per_epoch=390)
    assert d.margin_s == 30  # 5% of the budget (at least 5 s)
    spent = d.elapsed_s + (d.total_steps - 30) * (0.1 + 2.0 / 390) + d.final_s + d.margin_s
    assert 600 - (0.1 + 2.0 / 390) < spent <= 600 and not d.capped
    capped = budget.decide(600, 20, 30, 0.1, 2.0, 4.0, 0.0, max_steps=1000, steps_per_epoch=390)
    assert capped.total_steps == 1000 and capped.capped and "train.epochs caps it" in capped.line()
    late = budget.decide(60, 100, 30, 0.1, 2.0, 4.0, 0.0, 1000, 390)  # already over: stop where it is
    assert late.total_steps == 30
    assert budget.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_running_late_leaves_room_for_one_more_interval_and_the_final_evaluation():
    d = budget.decide(100, 10, 30, 0.1, 0.0, 4.0, 0.0, 10_000, 390)
    assert not budget.running_late(d, elapsed_s=100 - 4 - 2 - 7.5 - 0.1, log_every_steps=50)
    assert budget.running_late(d, elapsed_s=100 - 4 - 2 - 7.5, log_every_steps=50)


def test_the_decision_comes_before_the_warm_up_ends():
    assert budget.measure_steps(390) == 30 and budget.measure_steps(10) == 9 and budget.measure_steps(1) == 2


def test_budget_needs_a_warm_up_and_no_resizing():
    with pytest.raises(ConfigError, match="train.time_budget_s needs optim.warmup_epochs >= 1"):
        make_config("smoke", {"train.time_budget_s": 30, "optim.warmup_epochs": 0})
    with pytest.raises(ConfigError, match="no train.res_schedule"):
        make_config("speedrun", {"train.time_budget_s": 30, "train.res_schedule": "16:0.5"})
    with pytest.raises(ConfigError, match="train.time_budget_s must be >= 0"):
        make_config("smoke", {"train.time_budget_s": -1})


@pytest.mark.slow
def test_resume_keeps_the_decision(fake_cifar, tmp_path, capsys):
    """A run stopped after its decision (train.max_steps) continues on the recorded step count: no new
    measurement, the same budget.json, the checkpoint carries it, and the run ends at the decided step."""
    cfg = smoke_config(fake_cifar, **{"train.time_budget_s": 1e5, "train.epochs": 40, "train.threads": 1,
                                      "train.max_steps": 12})
    first = train(cfg, tmp_path / "r")
    decided = json.loads((tmp_path / "r" / "budget.json").read_text())
    assert first["step"] == 12 and load_checkpoint(tmp_path / "r")["budget"] == decided
    assert decided["decided_at_step"] == 8 and decided["total_steps"] > 12  # 9 steps an epoch: decided at 8
    assert "time budget: " in capsys.readouterr().out
    rest = train(smoke_config(fake_cifar, **{"train.time_budget_s": 1e5, "train.epochs": 40, "train.threads": 1}),
                 tmp_path / "r", resume=True)
    assert "time budget" not in capsys.readouterr().out  # not measured again
    assert json.loads((tmp_path / "r" / "budget.json").read_text()) == decided
    assert rest["status"] == "done" and rest["step"] == rest["total_steps"] == decided["total_steps"]
    assert rest["budget"] == decided


@pytest.mark.slow
def test_a_machine_that_slows_down_ends_early_within_the_budget(fake_cifar, tmp_path, monkeypatch, capsys):
    """After the decision every step takes 50 ms longer (another job on the cores): the run ends at a log step,
    with its final evaluation and result.json, inside the budget, and says where it stopped."""
    monkeypatch.setattr(budget, "_claimed", True)  # count from this call, not from the test process's start
    cfg = smoke_config(fake_cifar, **{"train.time_budget_s": 12, "train.epochs": 200, "train.threads": 1,
                                      "train.eval_every_epochs": 0, "train.log_every_steps": 5})
    slow = lambda step: time.sleep(0.05) if step > 8 else None  # noqa: E731
    start = time.monotonic()
    result = train(cfg, tmp_path / "r", step_hook=slow)
    took = time.monotonic() - start
    decided = result["budget"]["total_steps"]
    assert result["budget_cut_at_step"] == result["step"] < decided and result["step"] % 5 == 0
    assert result["status"] == "done" and result["total_steps"] == result["step"]  # ended as planned, earlier
    assert result["final_test_acc"] == result["final_test_acc"]  # evaluated (not NaN)
    assert took <= 12, took
    assert f"ending at step {result['step']} of {decided}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_command_ends_within_its_budget(tmp_path):
    """The whole `smallvit train` process, imports and data loading included, ends inside a 25 s budget, with
    train.epochs far more than fits."""
    sums = tmp_path / "sums.json"
    sums.write_text(json.dumps(write_fake_cifar10(tmp_path / "data", n_train=2000, n_test=500)))
    driver = ("import dataclasses, json, sys\nfrom smallvit.datasets import DATASETS\n"
              "DATASETS['cifar10'] = dataclasses.replace(DATASETS['cifar10'], md5=json.load(open(sys.argv[1])))\n"
              "from smallvit.cli import main\nsys.exit(main(sys.argv[2:]))\n")
    budget_s = 25
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", driver, str(sums), "train", "--preset", "smoke", "--data-dir",
                           str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--set", "data.subset=0",
                           "data.test_subset=0", "data.download=false", "train.epochs=1000",
                           "train.eval_every_epochs=5", f"train.time_budget_s={budget_s}"],
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["status"] == "done" and not result["budget"]["capped"] and result["step"] > 50  # cut or not
    assert took <= budget_s, f"{took:.1f} s for a {budget_s} s budget: {result['budget']}"
