"""Study reports (report.py): tables and plots from recorded runs, with and without a validation split."""

import json

import pytest

from smallvit.cli import main
from smallvit.report import report


def _fake_run(folder, acc, seed, params=1000, curve=((1.0, 50.0), (2.0, 60.0))):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"seed": seed}}))
    (folder / "result.json").write_text(json.dumps({
        "final_test_acc": acc, "params": params, "flops_per_image": 2e9, "train_img_per_s": 100.0,
        "wall_seconds": 60.0, "device": "cpu", "overrides": {}}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": int(e * 10), "epoch": e, "test_acc": a}) + "\n" for e, a in curve))


def test_report_from_recorded_runs(tmp_path, capsys):
    study = tmp_path / "augmentation"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"study": "augmentation", "seeds": 3,
                                                  "ablations": ["baseline", "-aa", "-mixup", "-cutmix"]}))
    for s, acc in enumerate([90.0, 91.0, 92.0]):
        _fake_run(study / "baseline" / f"seed{s}", acc, s)
    for s, acc in enumerate([85.0, 87.0]):
        _fake_run(study / "-aa" / f"seed{s}", acc, s)
    _fake_run(study / "-mixup" / "seed0", 91.5, 0)
    r = report(study)
    rows = {row["ablation"]: row for row in r["rows"]}
    assert rows["baseline"]["acc_mean"] == pytest.approx(91.0) and rows["baseline"]["acc_std"] == pytest.approx(1.0)
    assert rows["-aa"]["acc_mean"] == pytest.approx(86.0) and rows["-aa"]["delta"] == pytest.approx(-5.0)
    assert rows["-aa"]["paper_acc"] == 92.14 and rows["-aa"]["paper_delta"] == pytest.approx(92.14 - 93.65)
    assert rows["-mixup"]["significance"].startswith("n<2")
    assert "-aa (2/3)" in r["missing"] and "-cutmix (0/3)" in r["missing"]
    md = (study / "report.md").read_text()
    assert "| -aa |" in md and "86.00 ± 1.41" in md and "Missing seeds" in md
    assert (study / "report.csv").read_text().count("\n") == 4
    for png in ("accuracy.png", "curves.png"):
        assert (study / png).stat().st_size > 5000
    assert main(["report", str(study)]) == 0 and "| baseline |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "empty")]) == 2


@pytest.mark.slow
def test_study_with_a_split_reports_validation_and_test(fake_cifar, tmp_path, monkeypatch, capsys):
    from smallvit.experiments import STUDIES

    monkeypatch.setitem(STUDIES, "tiny", ["baseline", "-mixup"])
    root = tmp_path / "studies"
    sets = [f"data.data_dir={fake_cifar}", "data.download=false", "data.subset=0", "data.test_subset=0",
            "train.max_steps=4", "aug.autoaugment=none", "data.val_images=100", "train.threads=1"]
    assert main(["ablate", "tiny", "--preset", "smoke", "--seeds", "2", "--root", str(root), "--set", *sets]) == 0
    assert main(["report", str(root / "tiny")]) == 0
    table = (root / "tiny" / "report.md").read_text()
    assert "val acc % (mean ± std)" in table and "test acc % (mean ± std)" in table
    row = next(line for line in table.splitlines() if line.startswith("| baseline"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == "2" and "±" in cells[4] and "±" in cells[5]
