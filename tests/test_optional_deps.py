"""smallvit without its optional dependencies: every command parses, trains and reports with none of them.

The lent GPU machine (docs/gpu.md) has no submitit and cannot install anything. A subprocess with
sys.modules[name] = None makes `import name` raise ImportError, exactly as on a machine without the package.
"""

import json
import os
import subprocess
import sys

from conftest import REPO, write_fake_cifar10

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


def test_every_command_runs_without_the_optional_dependencies(tmp_path):
    sums = write_fake_cifar10(tmp_path / "data", n_train=200, n_test=64)
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(optional=OPTIONAL), json.dumps(sums),
                        str(tmp_path / "data"), str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(REPO / "src"), os.environ.get("PYTHONPATH", "")])})
    assert p.returncode == 0 and p.stdout.rstrip().endswith("OK"), p.stdout[-2000:] + p.stderr[-3000:]
    assert "needs submitit" in p.stderr and "pip install 'smallvit[slurm]'" in p.stderr
