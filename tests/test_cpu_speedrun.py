"""benchmarks/cpu_speedrun.py: the speed-run recipe on a validation split, its ablations, then the test set once."""

import json

import pytest

from conftest import REAL_DATA, needs_real_cifar
from smallvit.runs import read_metrics


@pytest.mark.slow
@needs_real_cifar
def test_cpu_speedrun_benchmark_runs_the_recipe_and_its_ablations(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cpu_speedrun

    tiny = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.subset=600", "data.test_subset=200",
            "train.epochs=2", "train.batch_size=100", "train.threads=1"]
    out = tmp_path / "table.md"
    args = ["--root", str(tmp_path / "runs"), "--data-dir", str(REAL_DATA), "--val-images", "100", "--seeds", "2",
            "--ablations=baseline,-gap", "--set", *tiny, "--out", str(out), "--plot", str(tmp_path / "acc.png")]
    assert cpu_speedrun.main(args) == 0
    text = out.read_text()
    assert "| speedrun (the recipe) | 1 |" in text and "| -gap (without it) | 1 |" in text
    assert "| **mean ± std** |" in text and text.count("| 0 |") == 1 and "| 1 |" in text
    assert "| passes |" in text and (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    val = json.loads((tmp_path / "runs" / "val" / "-gap" / "seed0" / "result.json").read_text())
    assert (val["eval_split"] == "val" and val["val_images"] == 100
            and "model.num_cls_tokens" not in val["overrides"])  # a CLS token again
    test = json.loads((tmp_path / "runs" / "test" / "seed1" / "result.json").read_text())
    assert test["eval_split"] == "test" and test["overrides"]["train.seed"] == 1
    evals = [m for m in read_metrics(tmp_path / "runs" / "test" / "seed1") if "test_acc" in m]
    assert len(evals) == 1  # the test set once, at the end
    assert cpu_speedrun.main(args) == 0 and out.read_text() == text  # finished runs are read, not rerun
