"""benchmarks/bench_gpu.py keeps every finished row when a later one fails, and the benchmark scripts run from a
checkout where smallvit is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_are_written_as_they_finish_and_a_failed_row_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "gpu.md"
    seen = {}

    def failing_loader(loader, dev, warmup, steps):  # what an OOM or a CUDA-graphs error looks like to the script
        seen["file"] = out.read_text()  # the smallvit row is already on disk
        raise RuntimeError("CUDA error: out of memory\nwith a long traceback")

    monkeypatch.setattr(bench_gpu, "bench_loader", failing_loader)
    runs, real_train, record = [], bench_gpu.train, bench_gpu.DATASETS["cifar10"]

    def spy(cfg, out_dir, resume=False, step_hook=None):  # the smallvit row is smallvit.train() itself
        t = cfg.train
        runs.append((t.max_steps, t.checkpoint_every_seconds, t.eval_every_epochs, t.progress, step_hook is not None))
        return real_train(cfg, out_dir, resume, step_hook=step_hook)

    monkeypatch.setattr(bench_gpu, "train", spy)
    bench_gpu.main(["--quick", "--stacks", "smallvit", "loader", "standard", "--workers", "0", "--steps", "2",
                    "--warmup", "1", "--batch", "16", "--data-dir", str(tmp_path / "none"), "--device", "cpu",
                    "--set", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "aug.chunk_images=32",
                    "--out", str(out)])
    assert "| smallvit | fp32 | no |" in seen["file"] and "| loader |" not in seen["file"]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| stack")]
    assert [r.split(" | ")[0] for r in rows] == ["| smallvit", "| loader", "| standard"]
    assert "FAILED: RuntimeError: CUDA error: out of memory |" in rows[1]
    assert "FAILED" not in rows[0] and "FAILED" not in rows[2]  # the run went on after the failure
    assert float(rows[2].split(" | ")[6].replace(",", "")) > 0  # steady img/s of the standard row
    assert "3 written as each finished, 1 failed" in text
    assert runs == [(3, 0, 0, False, True)]  # 1 warm-up + 2 measured steps, timed at the hook
    assert bench_gpu.DATASETS["cifar10"] is record  # the random images' md5s were accepted only while it ran


def test_cudagraph_skips_are_counted():
    """Inductor's counter, read around a block: a reduce-overhead row on CPU is marked as not using CUDA graphs."""
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    with bench_gpu.cudagraph_skips() as s:
        counters["inductor"]["cudagraph_skips"] += 1
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (arg0_1)\nmore")
    assert s == {"skips": 2, "reasons": ["skipping cudagraphs due to cpu device (arg0_1)"]}
    row = {"stack": "smallvit", "cudagraph_skips": 2, "cudagraph_reasons": ["skipping cudagraphs due to cpu device"]}
    assert "CUDA graphs skipped 2x (skipping cudagraphs due to cpu device)" in bench_gpu._notes(row)
    assert bench_gpu._notes({"cudagraph_skips": 0}) == "CUDA graphs used"


# Runs each benchmark script as `python benchmarks/X.py --help` would, with every installed smallvit hidden from the
# import system (the scripts import smallvit before parsing arguments).
NO_INSTALL = r"""
import os, runpy, sys
path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "smallvit"))]
for script in sys.argv[1:]:
    sys.path[:] = [os.path.dirname(script), *path]  # what `python script.py` puts first
    sys.modules.pop("timing", None)
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, script
    assert sys.modules["smallvit"].__file__.startswith(os.path.dirname(os.path.dirname(script))), script
    print("ok", os.path.basename(script))
"""


@pytest.mark.slow
def test_benchmark_scripts_run_without_installing_smallvit(tmp_path):
    scripts = [str(REPO / "benchmarks" / s) for s in ("bench_gpu.py", "bench_train.py", "bench_augment.py")]
    p = subprocess.run([sys.executable, "-c", NO_INSTALL, *scripts], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.count("ok ") == 3, p.stdout[-1000:] + p.stderr[-2000:]
