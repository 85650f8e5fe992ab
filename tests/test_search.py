"""Design-space search (search.py): spaces, refusals, constraint and validity pruning without training, a real
in-process search whose pruner stops a trial, the report, and (slow) concurrent journal workers, a killed worker,
PostgreSQL and SLURM. The data is conftest's tiny fake CIFAR-10, through test_slurm's `cluster` fixture, whose
sitecustomize lets worker subprocesses accept the fake files."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from smallvit import search as S
from smallvit.search_report import pareto
from smallvit.cli import main
from smallvit.config import ConfigError
from smallvit.experiments import SPACES
from test_slurm import cluster, needs_slurm  # noqa: F401  (a fixture, and the SLURM skip)

SETS = ["data.download=false", "data.subset=0", "data.test_subset=0", "train.threads=1", "data.val_images=64"]
SHORT = ["train.max_steps=2"]  # a trial trained in about a second
POSTGRES = os.environ.get("SMALLVIT_TEST_POSTGRES", "")
if not POSTGRES and os.environ.get("SMALLVIT_REQUIRE_SERVICES") == "1":
    needs_postgres = pytest.mark.usefixtures("_postgres_required")
else:
    needs_postgres = pytest.mark.skipif(not POSTGRES, reason="SMALLVIT_TEST_POSTGRES is not set "
                                                             "(scripts/postgres-local.sh start prints it)")


@pytest.fixture
def _postgres_required():
    pytest.fail("SMALLVIT_REQUIRE_SERVICES=1 but SMALLVIT_TEST_POSTGRES is not set")


def args(cluster, root: Path, name: str, *extra: str, sets=()) -> list[str]:  # noqa: F811
    return ["search", name, "--root", str(root), "--preset", "smoke", "--data-dir", str(cluster.data), *extra,
            "--set", *SETS, *sets]


def trials_of(root: Path, name: str, storage: str = ""):
    import optuna

    return optuna.load_study(study_name=name, storage=S.open_storage(storage, root / name)).get_trials()


# ---- spaces


@pytest.mark.parametrize("name", sorted(SPACES))
def test_built_in_spaces_parse(name):
    space = S.load_space(name)
    assert set(space) == set(SPACES[name])
    assert all(isinstance(d, list) or d["low"] < d["high"] for d in space.values())


def test_a_space_file_in_toml_and_json(tmp_path):
    (tmp_path / "s.toml").write_text('"aug.mixup" = [true, false]\n[model]\ndepth = {low = 1, high = 3}\n'
                                     '[optim]\nlr = {low = 1e-4, high = 1e-2, log = true}\n')
    (tmp_path / "s.json").write_text(json.dumps({"model.depth": {"low": 1, "high": 3}, "aug.mixup": [True, False]}))
    assert S.load_space(str(tmp_path / "s.toml")) == {
        "aug.mixup": [True, False], "model.depth": {"low": 1, "high": 3, "log": False},
        "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    assert S.load_space(str(tmp_path / "s.json"))["aug.mixup"] == [True, False]


@pytest.mark.parametrize("raw, match", [
    ({"model.nope": [1]}, "unknown config key 'model.nope'"),
    ({"model.depth": []}, "no choices"),
    ({"model.depth": {"low": 3, "high": 3}}, "empty range"),
    ({"optim.lr": {"low": 0.0, "high": 1.0, "log": True}}, "log range needs low > 0"),
    ({"model.depth": {"low": 1}}, "list of choices or"),
    ({"optim.name": {"low": 1, "high": 2}}, "not a number"),
    ({"optim.name": ["adamw", "sgd"]}, "optim.name must be one of"),
    ({"model.depth": "4"}, "list of choices or"),
    ({}, "expected a table"),
])
def test_bad_spaces_are_refused(raw, match):
    with pytest.raises(ConfigError, match=match):
        S.parse_space(raw, "test")


def test_objectives_registry_and_parsing():
    assert S.parse_objective("val_acc") == ["val_acc", "maximize"]
    assert S.parse_objective("params:min") == ["params", "minimize"]
    assert all(o.direction in ("maximize", "minimize") for o in S.OBJECTIVES.values())
    with pytest.raises(ConfigError, match="unknown objective"):
        S.parse_objective("loss")


def test_pareto_front():
    assert pareto([(1, 10.0), (2, 5.0), (3, 20.0), (4, 20.0), (0.5, 1.0)]) == [4, 0, 2]


# ---- refusals: one line, exit 2, nothing written


@pytest.mark.parametrize("extra, sets, match", [
    (["--space", "nope"], [], "unknown space 'nope'"),
    (["--space", "missing.toml"], [], "space file missing.toml not found"),
    (["--objective", "loss"], [], "unknown objective"),
    (["--max-params", "100"], [], "no configuration can meet it"),
    (["--max-flops", "1000"], [], "no configuration can meet it"),
    ([], ["data.val_images=0"], "validation split"),
    ([], ["model.depth=2"], "both set"),
    (["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/none"], [], "cannot connect"),
    (["--objective", "val_acc", "--objective", "params", "--pruner", "median"], [], "single-objective"),
    (["--trials", "0"], [], "--trials must be at least 1"),
    ([], ["ssl.out_dim=8"], "not read by `smallvit search`"),
])
def test_bad_input_is_one_line_and_writes_nothing(cluster, capsys, tmp_path, extra, sets, match):  # noqa: F811
    code = main(args(cluster, tmp_path, "bad", *extra, sets=sets))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()


def test_malformed_space_file(cluster, capsys, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndepth = [1, 2]\n")
    code = main(args(cluster, tmp_path / "root", "bad", "--space", str(bad)))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "malformed" in err, err


# ---- in process (trainings are `slow`, as every training in the suite)


@pytest.fixture
def trained(monkeypatch):
    """Trials without training: `train` records the (width, heads) it was given and scores the width."""
    calls = []

    def fake_train(cfg, out, resume=False, step_hook=None):
        calls.append((cfg.model.embed_dim, cfg.model.num_heads))
        Path(out).mkdir(parents=True)
        result = {"status": "done", "final_val_acc": float(cfg.model.embed_dim), "params": 1, "flops_per_image": 1,
                  "wall_seconds": 1.0}
        (Path(out) / "result.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(importlib.import_module("smallvit.train"), "train", fake_train)
    return calls


def test_infeasible_and_invalid_trials_are_pruned_without_training(cluster, capsys, trained, tmp_path):  # noqa: F811
    space = tmp_path / "space.json"  # heads 3 divides neither width; width 32 has too many parameters
    space.write_text(json.dumps({"model.embed_dim": [16, 32], "model.num_heads": [3, 4]}))
    code = main(args(cluster, tmp_path, "cons", "--space", str(space), "--trials", "8", "--max-params", "15000"))
    assert code == 0, capsys.readouterr().err
    trials = trials_of(tmp_path, "cons")
    assert len(trials) == 8
    reasons = {t.number: t.user_attrs.get("prune_reason", "") for t in trials}
    assert any(r.startswith("invalid: model.num_heads=3 must divide") for r in reasons.values()), reasons
    assert any(r.startswith("infeasible:") and "--max-params 15,000" in r for r in reasons.values()), reasons
    assert set(trained) == {(16, 4)} and len(trained) == sum(not r for r in reasons.values())
    for t in trials:
        folder = tmp_path / "cons" / f"trial-{t.number:04d}"
        if reasons[t.number]:  # pruned before training: no run folder
            assert t.state.name == "PRUNED" and not folder.exists()
        else:
            assert t.state.name == "COMPLETE" and t.values == [16.0] and (folder / "result.json").is_file()


def test_enqueue_preset_tries_the_hand_made_point_first_once(cluster, capsys, trained, tmp_path):  # noqa: F811
    cmd = args(cluster, tmp_path, "pre", "--space", "tiny", "--pruner", "none", "--enqueue-preset")
    assert main([*cmd, "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "queued as the next trial" in out and "trial 0 (the preset): complete: val 32.00%" in out, out
    smoke = S.read_settings(tmp_path / "pre").base()
    first = trials_of(tmp_path, "pre")[0]
    assert first.user_attrs["preset"] and first.params == {"model.embed_dim": smoke.model.embed_dim,
                                                           "model.depth": smoke.model.depth,
                                                           "model.num_heads": smoke.model.num_heads,
                                                           "optim.lr": smoke.optim.lr}
    assert main([*cmd, "--trials", "3"]) == 0  # a rerun does not queue it again
    assert "queued as the next trial" not in capsys.readouterr().out
    assert sum(bool(t.user_attrs.get("preset")) for t in trials_of(tmp_path, "pre")) == 1
    assert "| 0 (preset) | complete |" in (tmp_path / "pre" / "search.md").read_text()


def test_finalize_refuses_to_mix_retrains_of_other_overrides(cluster, capsys, trained, tmp_path):  # noqa: F811
    assert main(args(cluster, tmp_path, "mix", "--space", "tiny", "--pruner", "none", "--trials", "2")) == 0
    final = tmp_path / "mix" / "final"
    final.mkdir()
    (final / "final.json").write_text(json.dumps({"entries": {"baseline": {}}, "seeds": 3, "overrides": {
        "data.val_images": 0, "train.eval_every_epochs": 0, "train.time_budget_s": 120.0}}))
    capsys.readouterr()
    code = main(["search", "mix", "--root", str(tmp_path), "--finalize", "--final-set", "train.time_budget_s=590"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds retrains with other overrides" in err, err
    assert [p.name for p in final.iterdir()] == ["final.json"]  # nothing trained, the record kept


def test_a_dead_workers_preset_trial_is_retried_as_the_preset():
    import optuna

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"model.depth": 2}, user_attrs={"preset": True})
    t = study.ask({"model.depth": optuna.distributions.IntDistribution(1, 2)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its worker died
    t.set_user_attr("worker", {"host": os.uname().nodename, "pid": dead.pid})
    t.set_user_attr("heartbeat", time.time())
    t.set_user_attr("run", "/runs/trial-0000")
    assert S.fail_stale(study) == 1
    failed, retry = study.get_trials(deepcopy=False)
    assert failed.state.name == "FAIL" and "died" in failed.user_attrs["error"]
    assert retry.state.name == "WAITING" and retry.params == {} and retry.system_attrs["fixed_params"] == {
        "model.depth": 2}
    assert retry.user_attrs == {"retry_of": 0, "run": "/runs/trial-0000", "preset": True}


def test_enqueue_preset_outside_the_space_is_refused(cluster, capsys, tmp_path):  # noqa: F811
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"model.embed_dim": [16, 24]}))  # the smoke preset's width is 32
    code = main(args(cluster, tmp_path, "bad", "--space", str(space), "--enqueue-preset"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the preset's model.embed_dim=32 is not among" in err, err
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def searched(cluster, tmp_path_factory):  # noqa: F811
    """A small real search: 6 trials, 3 evaluations each, the median pruner; a learning rate that learns nothing
    (1e-6) is a choice, so that some trial falls behind the median at its first evaluation."""
    root = tmp_path_factory.mktemp("search")
    space = root / "space.json"
    space.write_text(json.dumps({"optim.lr": [1e-6, 3e-3], "model.depth": {"low": 1, "high": 2}}))
    assert main(args(cluster, root, "tiny", "--space", str(space), "--pruner", "median", "--trials", "6",
                     sets=["train.epochs=3"])) == 0
    return root


@pytest.mark.slow
def test_the_pruner_stops_a_trial(searched):
    trials = trials_of(searched, "tiny")
    assert len(trials) == 6 and len({t.number for t in trials}) == 6
    pruned = [t for t in trials if t.user_attrs.get("prune_reason", "").startswith("pruner:")]
    assert pruned, [(t.number, t.state, t.intermediate_values) for t in trials]
    for t in pruned:  # stopped while training: a run folder with a checkpoint, no result
        folder = Path(t.user_attrs["run"])
        assert t.state.name == "PRUNED" and not (folder / "result.json").exists()
        assert t.intermediate_values and max(t.intermediate_values) < 3
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete and all(sorted(t.intermediate_values) == [1, 2] for t in complete)  # the 3rd is the end's
    for t in complete:  # an ordinary run: its val accuracy is the objective, its test set unseen until the end
        result = json.loads((Path(t.user_attrs["run"]) / "result.json").read_text())
        assert t.values == [result["final_val_acc"]] and result["eval_split"] == "val"


@pytest.mark.slow
def test_report_files(searched, capsys):
    folder = searched / "tiny"
    assert main(["report", str(folder)]) == 0
    md = (folder / "search.md").read_text()
    assert "## Trials" in md and "| trial | state | params | flops | seconds | val_acc |" in md
    assert "pruner: validation accuracy" in md and "## Pareto fronts" in md and "fANOVA" in md
    assert "| optim.lr |" in md  # the importance table
    for cost in ("params", "flops", "seconds"):
        assert (folder / f"pareto-{cost}.png").stat().st_size > 1000
    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("trial,state,params,flops,seconds,val_acc")


@pytest.mark.slow
def test_changed_settings_are_refused(searched, cluster, capsys):  # noqa: F811
    same = ["--space", str(searched / "space.json"), "--pruner", "median"]
    code = main(args(cluster, searched, "tiny", "--trials", "6", "--space", "tiny", "--pruner", "median",
                     sets=["train.epochs=3"]))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "other space" in err, err
    code = main(args(cluster, searched, "tiny", "--trials", "6", *same, sets=["train.epochs=4"]))
    assert code == 2 and "other overrides" in capsys.readouterr().err


@pytest.mark.slow
def test_rerun_with_more_trials_continues(searched, cluster, capsys):  # noqa: F811
    assert main(args(cluster, searched, "tiny", "--trials", "7", "--space", str(searched / "space.json"), "--pruner",
                     "median", sets=["train.epochs=3"])) == 0
    assert "6 of 7 trials done" in capsys.readouterr().out
    assert len(trials_of(searched, "tiny")) == 7


@pytest.mark.slow
def test_finalize_retrains_top_k_and_the_baseline_on_the_test_set(cluster, capsys, tmp_path):  # noqa: F811
    assert main(args(cluster, tmp_path, "fin", "--trials", "2", "--pruner", "none", "--retrain-top", "1",
                     "--seeds", "2", sets=SHORT)) == 0
    final = tmp_path / "fin" / "final"
    labels = sorted(p.name for p in final.iterdir() if p.is_dir())
    assert labels[0] == "baseline" and len(labels) == 2
    for label in labels:
        for seed in (0, 1):
            cfg = json.loads((final / label / f"seed{seed}" / "config.json").read_text())
            assert cfg["data"]["val_images"] == 0 and cfg["train"]["eval_every_epochs"] == 0
            assert cfg["train"]["seed"] == seed
    md = (tmp_path / "fin" / "search.md").read_text()
    assert "scored once on the test set" in md and "| baseline | 2 |" in md and "Δ vs baseline" in md


# ---- end to end: worker processes, a killed worker, PostgreSQL, SLURM


@pytest.mark.slow
def test_concurrent_journal_workers_add_up(cluster, capsys, tmp_path):  # noqa: F811
    assert main(args(cluster, tmp_path, "par", "--trials", "6", "--workers", "3", "--pruner", "none",
                     sets=SHORT)) == 0
    trials = trials_of(tmp_path, "par")
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]
    runs = {t.user_attrs["run"] for t in trials}
    assert len(runs) == 6 and all((Path(r) / "result.json").is_file() for r in runs)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 3  # three processes shared the journal
    logs = sorted((tmp_path / "par").glob("worker*.log"))
    assert len(logs) == 3


@pytest.mark.slow
def test_a_killed_search_continues_where_it_stopped(cluster, capsys, tmp_path):  # noqa: F811
    cmd = [sys.executable, "-m", "smallvit.cli", *args(cluster, tmp_path, "kill", "--trials", "3", "--pruner",
                                                       "none", sets=["train.epochs=12", "train.log_every_steps=1"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "kill" / "trial-0001" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (second.is_file() and second.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the search ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(cmd[3:]) == 0  # the same command again
    trials = trials_of(tmp_path, "kill")
    died = [t for t in trials if t.state.name == "FAIL"]
    assert len(died) == 1 and died[0].number == 1 and "died" in died[0].user_attrs["error"], died
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.state.name == "COMPLETE" and retry.params == died[0].params
    assert retry.user_attrs["run"] == died[0].user_attrs["run"]  # resumed in its run folder
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3 and len(trials) == 4


@pytest.mark.slow
@needs_postgres
def test_postgres_storage(cluster, capsys, tmp_path):  # noqa: F811
    import optuna

    name = f"pg-{uuid.uuid4().hex[:8]}"
    try:
        assert main(args(cluster, tmp_path, name, "--trials", "3", "--workers", "2", "--pruner", "none",
                         "--storage", POSTGRES, sets=SHORT)) == 0
        study = optuna.load_study(study_name=name, storage=POSTGRES)  # as optuna-dashboard would open it
        assert sorted(t.number for t in study.trials) == [0, 1, 2]
        assert all(t.state.name == "COMPLETE" for t in study.trials)
        assert not (tmp_path / name / S.JOURNAL).exists()
        assert main(["search", name, "--root", str(tmp_path), "--report"]) == 0
    finally:
        optuna.delete_study(study_name=name, storage=POSTGRES)


@pytest.mark.slow
@needs_slurm
def test_search_through_slurm_workers(cluster, capsys, tmp_path):  # noqa: F811
    assert main(args(cluster, tmp_path, "sl", "--trials", "4", "--pruner", "none", "--launcher", "slurm",
                     "--workers", "2", "--max-parallel", "2", "--cpus-per-run", "1", "--wait", sets=SHORT)) == 0
    trials = trials_of(tmp_path, "sl")
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.user_attrs) for t in trials]
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    assert (tmp_path / "sl" / "search.md").is_file()
