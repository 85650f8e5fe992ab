"""What changes on a GPU or under torchrun, checked on CPU: fused AdamW after a resume, the compile mode under
torchrun, one download for all ranks."""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, smoke_config, write_fake_cifar10
from smallvit import distributed as dist_
from smallvit import optim
from smallvit.config import OptimConfig
from smallvit.experiments import make_config
from smallvit.backbones import build_model
from smallvit.runs import load_checkpoint

T = importlib.import_module("smallvit.train")
CUDA = torch.device("cuda")  # only decides fused=True in build_optimizer / match_device; every tensor stays on CPU


def _adamw(device: torch.device):
    torch.manual_seed(0)
    model = build_model(make_config("smoke").model)
    return model, optim.build_optimizer(model, OptimConfig(), device)


def _step(model, opt):
    torch.manual_seed(2)  # drop path
    model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).sum().backward()
    opt.step()
    opt.zero_grad()


def test_cpu_checkpoint_resumed_on_cuda_runs_fused():
    model, cpu_opt = _adamw(torch.device("cpu"))
    _step(model, cpu_opt)
    saved = copy.deepcopy(cpu_opt.state_dict())  # as written to and read from a checkpoint
    assert saved["param_groups"][0]["fused"] is False
    model2, opt = _adamw(CUDA)
    assert opt.param_groups[0]["fused"]
    model2.load_state_dict(model.state_dict())
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["fused"] is False  # what load_state_dict does: the saved group options come back
    optim.match_device(opt, CUDA)
    assert all(g["fused"] for g in opt.param_groups)
    steps = [s["step"] for s in opt.state.values()]
    assert steps and all(s.dtype == torch.float32 and float(s) == 1.0 for s in steps)
    _step(model2, opt)  # the fused kernel runs on the loaded state
    _step(model, cpu_opt)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the fused and the loop kernels agree
    optim.match_device(opt, torch.device("cpu"))  # and back: a CUDA checkpoint resumed on CPU
    assert not any(g["fused"] for g in opt.param_groups)


def test_train_resume_sets_this_devices_optimizer_options(fake_cifar, tmp_path, monkeypatch):
    """train() puts the device's fused choice back after loading the checkpoint (seen in the next checkpoint)."""
    out = tmp_path / "r"
    T.train(smoke_config(fake_cifar, **{"train.max_steps": 2}), out)
    assert load_checkpoint(out)["optimizer"]["param_groups"][0]["fused"] is False
    monkeypatch.setattr(T, "match_device", lambda opt, device: optim.match_device(opt, CUDA))  # as if on CUDA
    T.train(smoke_config(fake_cifar, **{"train.max_steps": 3}), out, resume=True)
    assert load_checkpoint(out)["optimizer"]["param_groups"][0]["fused"] is True


@pytest.mark.parametrize("mode, world, expected", [
    ("reduce-overhead", 1, "reduce-overhead"), ("max-autotune", 1, "max-autotune"), ("default", 2, "default"),
    ("reduce-overhead", 2, "default"), ("max-autotune", 2, "max-autotune-no-cudagraphs"),
    ("max-autotune-no-cudagraphs", 2, "max-autotune-no-cudagraphs")])
def test_compile_mode_under_torchrun_has_no_cuda_graphs(mode, world, expected):
    got, note = dist_.compile_mode(mode, world)
    assert got == expected and (note is None) == (got == mode)
    if note:
        assert mode in note and expected in note


DRIVER = r"""
import dataclasses, json, os, sys, time
import torch
from conftest import write_fake_cifar10
from smallvit import data as D
from smallvit import train
from smallvit.datasets import DATASETS

sums, data, log, out = sys.argv[1:5]
DATASETS["cifar10"] = dataclasses.replace(DATASETS["cifar10"], md5=json.loads(open(sums).read()))
rank = os.environ["RANK"]

def download(root, info):  # the network, simulated: slow, and it says who called it
    with open(log, "a") as f:
        f.write(f"download {rank} start\n")
    time.sleep(1.0)
    write_fake_cifar10(root)
    with open(log, "a") as f:
        f.write(f"download {rank} end\n")

def compile_(model, mode=None):
    with open(log, "a") as f:
        f.write(f"compile {rank} {mode}\n")
    return model

D._download = download
torch.compile = compile_
from conftest import smoke_config
cfg = smoke_config(data, **{"data.download": True, "train.max_steps": 1, "train.compile": True,
                            "train.compile_mode": "max-autotune", "data.test_subset": 64})
train(cfg, out)
"""


def test_torchrun_downloads_once_and_compiles_without_cuda_graphs(tmp_path):
    """2 gloo processes, data missing, download on: rank 0 downloads while rank 1 waits, then both train;
    compile_mode=max-autotune reaches torch.compile as max-autotune-no-cudagraphs on both ranks."""
    sums = tmp_path / "sums.json"
    sums.write_text(json.dumps(write_fake_cifar10(tmp_path / "scratch")))  # the same bytes the fake download writes
    driver, log, data = tmp_path / "driver.py", tmp_path / "log.txt", tmp_path / "data"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), str(sums), str(data), str(log), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert [line for line in lines if line.startswith("download")] == ["download 0 start", "download 0 end"]
    assert sorted(line for line in lines if line.startswith("compile")) == [
        "compile 0 max-autotune-no-cudagraphs", "compile 1 max-autotune-no-cudagraphs"]
    assert "runs as max-autotune-no-cudagraphs" in p.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["world_size"] == 2
