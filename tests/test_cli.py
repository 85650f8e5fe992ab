"""The command line (cli.py): bad input is one message and exit code 2, train/eval/info end to end, `python -m
smallvit`, and every command without the optional dependencies.

The lent GPU machine (docs/gpu.md) has no submitit and cannot install anything. A subprocess with
sys.modules[name] = None makes `import name` raise ImportError, exactly as on a machine without the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_one_error, run_main, train_args, write_fake_cifar10
from smallvit.cli import main

pytestmark = pytest.mark.usefixtures("restore_threads")  # in-process runs use one thread


@pytest.mark.parametrize("setting, message", [
    ("model.bogus=1", "unknown config key 'model.bogus'"),
    ("model.depth=abc", "model.depth: expected an integer"),
    ("optim.lr=-1", "optim.lr must be positive"),
    ("train.on_nonfinite=maybe", "train.on_nonfinite must be one of stop, skip"),
    ("model.num_heads=5", "model.num_heads=5 must divide model.embed_dim=32"),
    ("train.device=cuda:7" if not torch.cuda.is_available() else "train.batch_size=100000", ""),
])
def test_cli_bad_config_is_one_error(fake_cifar, tmp_path, capsys, setting, message):
    code, err = run_main(capsys, *train_args(fake_cifar, tmp_path / "r", setting))
    assert code == 2
    assert_one_error(err, message)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_cli_missing_and_corrupt_dataset(fake_cifar, tmp_path, capsys):
    code, err = run_main(capsys, *train_args(tmp_path / "empty", tmp_path / "r"))
    assert code == 2
    assert_one_error(err, "cifar10: missing")
    batch = fake_cifar / "cifar-10-batches-py" / "data_batch_2"
    damaged = bytearray(batch.read_bytes())
    damaged[1000] ^= 0xFF
    batch.write_bytes(bytes(damaged))
    code, err = run_main(capsys, *train_args(fake_cifar, tmp_path / "r"))
    assert code == 2
    assert_one_error(err, "cifar10:")
    assert "md5" in err and batch.read_bytes() == bytes(damaged)  # reported, not deleted or replaced


def _json_tail(text: str) -> dict:
    return json.loads(text[text.index("{"):])


@pytest.mark.slow
def test_cli_train_eval_info(fake_cifar, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--preset", "smoke", "--data-dir", str(fake_cifar), "--set", "data.download=false",
            "data.subset=0", "data.test_subset=0", "train.max_steps=3"]
    assert main(["train", *args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", str(fake_cifar), "--tta-flip"]) == 0
    report = _json_tail(capsys.readouterr().out)
    assert 0 <= report["test_acc"] <= 100 and "test_acc_tta_flip" in report and len(report["per_class_acc"]) == 10
    assert (out / "confusion.png").stat().st_size > 1000
    assert main(["info", "--ablation", "mla-q"]) == 0
    info = _json_tail(capsys.readouterr().out)
    assert info["params"] == 3_441_226 and info["diff_from_baseline"] == {"model.latent": "q"}
    assert main(["info", "--ablation", "-aa"]) == 0  # a name that starts with a dash is still a value
    assert _json_tail(capsys.readouterr().out)["diff_from_baseline"] == {"aug.autoaugment": "none"}
    assert main(["info", "--set", "model.depth=9", "--set", "model.drop_path=0", "optim.lr=0.002"]) == 0
    assert _json_tail(capsys.readouterr().out)["diff_from_baseline"] == {  # repeated --set flags add up
        "model.depth": 9, "model.drop_path": 0.0, "optim.lr": 0.002}
    assert main(["train", *args, "--set", "model.bogus=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_version_and_python_dash_m():
    import subprocess
    import sys

    from smallvit import __version__

    out = subprocess.run([sys.executable, "-m", "smallvit", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"smallvit {__version__}"
    out = subprocess.run([sys.executable, "-m", "smallvit", "ablations"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "mla-qkv" in out.stdout


OPTIONAL = ("submitit", "wandb", "optuna", "onnx", "onnxruntime", "onnxscript", "numba")


SCRIPT = """
import dataclasses, json, sys
for name in {optional!r}:
    sys.modules[name] = None  # import name -> ImportError
from smallvit.cli import main
from smallvit.datasets import DATASETS

DATASETS["cifar10"] = dataclasses.replace(DATASETS["cifar10"], md5=json.loads(sys.argv[1]))
for argv in (["--help"], ["train", "--help"], ["ablate", "--help"], ["pretrain", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
common = ["--preset", "smoke", "--set", "data.data_dir=" + sys.argv[2], "data.download=false", "data.subset=0",
          "data.test_subset=0", "train.threads=1", "train.max_steps=2"]
assert main(["train", *common, "--out", sys.argv[3] + "/t"]) == 0
assert main(["pretrain", *common, "ssl.local_crops=1", "ssl.out_dim=64", "--out", sys.argv[3] + "/p"]) == 0
assert main(["info", "--preset", "pretrain"]) == 0
assert main(["train", *common, "--out", sys.argv[3] + "/s", "--launcher", "slurm"]) == 2  # one clear error
print("OK")
"""


@pytest.mark.slow
def test_every_command_runs_without_the_optional_dependencies(tmp_path):
    sums = write_fake_cifar10(tmp_path / "data", n_train=200, n_test=64)
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(optional=OPTIONAL), json.dumps(sums),
                        str(tmp_path / "data"), str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(REPO / "src"), os.environ.get("PYTHONPATH", "")])})
    assert p.returncode == 0 and p.stdout.rstrip().endswith("OK"), p.stdout[-2000:] + p.stderr[-3000:]
    assert "needs submitit" in p.stderr and "pip install 'smallvit[slurm]'" in p.stderr
