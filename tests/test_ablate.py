"""Studies (ablate.py): the budget, skipped and resumed runs, several devices, reruns with other settings."""

import json
import sys
from pathlib import Path

import pytest

from conftest import REAL_DATA, needs_real_cifar, smoke_config
from smallvit.ablate import ablate, plan, scaled
from smallvit.cli import main
from smallvit.config import ConfigError
from smallvit.experiments import STUDIES, make_config
from smallvit.report import report
from smallvit.runs import load_checkpoint


@pytest.fixture
def tiny_study(monkeypatch, fake_cifar):
    monkeypatch.setitem(STUDIES, "tiny", ["baseline", "-mixup"])
    overrides = {"data.data_dir": str(fake_cifar), "data.download": False, "data.subset": 0,
                 "data.test_subset": 0, "train.max_steps": 4, "aug.autoaugment": "none"}
    return overrides


def test_budget_scales_the_recipe():
    cfg = scaled(make_config("baseline"), 0.1)
    assert (cfg.train.epochs, cfg.optim.warmup_epochs, cfg.train.eval_every_epochs) == (10, 1, 5)
    runs = plan("mla", 3, "quick", 0.5)
    assert len(runs) == 6 * 3 and {r[2].train.epochs for r in runs} == {4}
    assert {r[2].model.latent for r in runs if r[0] == "mla-qkv"} == {"qkv"}


@pytest.mark.slow
def test_study_skips_finished_and_resumes_killed_runs(tiny_study, tmp_path, monkeypatch):
    calls = []
    train_module = sys.modules["smallvit.train"]
    real_train = train_module.train

    def counting(cfg, out, resume=False):
        calls.append(str(out))
        return real_train(cfg, out, resume=resume)

    monkeypatch.setattr(train_module, "train", counting)
    root = tmp_path / "studies"
    # A run killed part-way: a checkpoint without result.json.
    killed = root / "tiny" / "-mixup" / "seed1"
    part = smoke_config(tiny_study["data.data_dir"], **{**tiny_study, "train.max_steps": 2, "train.seed": 1,
                                                        "aug.mixup": False})
    real_train(part, killed)
    (killed / "result.json").unlink()
    rows = ablate("tiny", seeds=2, preset="smoke", root=root, overrides=tiny_study)
    assert len(rows) == 4 and all(r["state"] == "done" for r in rows)
    assert len(calls) == 4
    assert load_checkpoint(killed)["step"] == 4  # continued from step 2, not restarted elsewhere
    calls.clear()
    ablate("tiny", seeds=2, preset="smoke", root=root, overrides=tiny_study)
    assert calls == []  # everything finished: nothing runs again
    ablate("tiny", seeds=3, preset="smoke", root=root, overrides=tiny_study)
    assert len(calls) == 2 and all(c.endswith("seed2") for c in calls)


@pytest.mark.slow
@needs_real_cifar
def test_several_devices_run_side_by_side(monkeypatch, tmp_path):
    """Two 'devices' (both the CPU here): each run goes to its own `smallvit train` process, one per device."""
    monkeypatch.setitem(STUDIES, "tiny2", ["baseline", "-mixup"])
    sets = ["data.subset=256", "data.test_subset=128", "train.max_steps=2", "aug.autoaugment=none",
            "train.threads=1"]
    rows = ablate("tiny2", seeds=1, preset="smoke", root=tmp_path, devices=["cpu", "cpu"], cli_overrides=sets,
                  data_dir=str(REAL_DATA))
    assert [r["state"] for r in rows] == ["done", "done"]
    for r in rows:
        result = json.loads((Path(r["folder"]) / "result.json").read_text())
        assert result["step"] == 2 and (Path(r["folder"]) / "stdout.log").is_file()


@pytest.mark.slow
def test_study_rerun_with_other_settings_is_refused_or_trained_apart(tiny_study, tmp_path, capsys):
    """Finished runs are reused only when they are the runs the study would train now; otherwise one line names
    the differing key, nothing is trained or rewritten, and --new-folders trains the new settings beside them."""
    root = tmp_path / "studies"
    ablate("tiny", seeds=1, preset="smoke", root=root, overrides=tiny_study)
    study_json = (root / "tiny" / "study.json").read_bytes()
    results = {p: p.read_bytes() for p in (root / "tiny").rglob("result.json")}
    args = ["ablate", "tiny", "--preset", "smoke", "--root", str(root), "--no-report", "--set",
            *(f"{k}={v}" for k, v in tiny_study.items())]
    capsys.readouterr()
    assert main([*args, "optim.lr=0.0123"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "trained with other settings" in err and "optim.lr 0.001 -> 0.0123" in err and "--new-folders" in err
    assert (root / "tiny" / "study.json").read_bytes() == study_json  # never claims settings its runs did not use
    assert {p: p.read_bytes() for p in (root / "tiny").rglob("result.json")} == results
    assert main([*args, "optim.lr=0.0123", "--new-folders"]) == 0
    (fork,) = [p for p in root.iterdir() if p.name.startswith("tiny@")]
    for cfg in fork.rglob("config.json"):
        assert json.loads(cfg.read_text())["optim"]["lr"] == 0.0123
    assert json.loads((fork / "study.json").read_text())["overrides"]["optim.lr"] == "0.0123"
    assert main([*args, "optim.lr=0.0123", "--new-folders"]) == 0  # the same settings: the same folder, reused
    assert [p for p in root.iterdir() if p.name.startswith("tiny@")] == [fork]
    # a report labels each row from the runs' own config.json, and refuses a group that mixes two experiments
    rows = report(fork)["rows"]
    assert json.loads(next(r for r in rows if r["ablation"] == "-mixup")["diff"]) == {"aug.mixup": False}
    odd = fork / "-mixup" / "seed1"
    odd.mkdir()
    for f in ("result.json", "config.json"):
        (odd / f).write_text((fork / "baseline" / "seed0" / f).read_text())
    with pytest.raises(ConfigError, match="'-mixup' were trained with different settings \\(aug.mixup"):
        report(fork)
