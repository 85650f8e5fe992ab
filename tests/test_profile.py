"""`smallvit profile` (profile.py) on CPU: a trace and the step's breakdown by phase."""

import json
from pathlib import Path

import pytest

from smallvit.cli import main

pytestmark = pytest.mark.slow  # profiles real training steps


def test_profile_on_cpu_writes_a_trace_and_the_step_breakdown(fake_cifar, tmp_path, capsys):
    out = tmp_path / "prof"
    args = ["profile", "--preset", "smoke", "--out", str(out), "--set", f"data.data_dir={fake_cifar}",
            "data.download=false", "train.threads=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    n = json.loads((out / "profile.json").read_text())
    assert n["steps_profiled"] == 8 == n["steps_per_augment_chunk"]  # smoke: 512 images per chunk, batch 64
    labels = ["augmentation", "forward (+ loss)", "backward", "optimiser (step, zero_grad)"]
    assert all(n["phases"][k]["cpu_ms"] > 0 for k in labels)
    assert sum(n["phases"][k]["cpu_ms"] for k in labels) <= n["step_ms"] * 1.001
    assert n["top_ops"][0]["self_cpu_ms"] >= n["top_ops"][-1]["self_cpu_ms"] > 0
    assert n["peak_memory"]["GiB"] > 0
    md = (out / "profile.md").read_text()
    assert md in printed and all(f"| {k} |" in md for k in labels)
    trace = json.loads(Path(n["trace"]).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "augment"} <= names and sum(str(s).startswith("ProfilerStep#") for s in names) == 8
