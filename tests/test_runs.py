"""A run folder's files (runs.py): an existing run is never overwritten, a bad checkpoint is one error and left
alone, a full disk keeps the last good checkpoint, a model mismatch names its keys."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import assert_one_error, one_thread_config, run_main, smoke_config, train_args
from smallvit.backbones import build_model
from smallvit.cli import main
from smallvit.runs import CheckpointError, Records, load_checkpoint, load_model_state

pytestmark = pytest.mark.usefixtures("restore_threads")  # in-process runs use one thread


def _finished_part(data: Path, out: Path, capsys, steps: int = 9) -> bytes:
    assert main(train_args(data, out, f"train.max_steps={steps}")) == 0
    capsys.readouterr()
    return (out / "checkpoint.pt").read_bytes()


@pytest.mark.slow
def test_existing_run_is_never_overwritten(fake_cifar, tmp_path, capsys):
    out = tmp_path / "r"
    before = _finished_part(fake_cifar, out, capsys)
    metrics = (out / "metrics.jsonl").read_bytes()
    code, err = run_main(capsys, *train_args(fake_cifar, out))
    assert code == 2
    assert_one_error(err, f"{out} already holds a run")
    code, err = run_main(capsys, *train_args(fake_cifar, out, "model.depth=3", "--resume"))
    assert code == 2
    assert_one_error(err, f"{out / 'config.json'} was written with a different config")
    assert (out / "checkpoint.pt").read_bytes() == before and (out / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["garbage", "truncated", "not-weights-only", "weights-only", "other-model"])
def test_bad_checkpoint_is_one_error_and_left_alone(fake_cifar, tmp_path, capsys, kind):
    out = tmp_path / "r"
    good = _finished_part(fake_cifar, out, capsys)
    path = out / "checkpoint.pt"
    marker = tmp_path / "pwned"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "not-weights-only":  # a pickle that would run code if loaded without weights_only=True
        path.write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
    elif kind == "weights-only":
        torch.save({"model": load_checkpoint(out)["model"], "config": load_checkpoint(out)["config"],
                    "format": 1}, path)
    else:  # same config, but the weights of another architecture
        state = load_checkpoint(out)
        state["model"] = build_model(one_thread_config(fake_cifar, **{"model.depth": 3}).model).state_dict()
        torch.save(state, path)
    bad = path.read_bytes()
    code, err = run_main(capsys, *train_args(fake_cifar, out, "--resume"))
    assert code == 2
    assert_one_error(err, "")
    expected = {"garbage": "is not a readable smallvit checkpoint", "truncated": "is not a readable smallvit",
                "not-weights-only": "may be unsafe", "weights-only": "cannot be resumed",
                "other-model": "was saved from a different model"}[kind]
    assert expected in err and path.read_bytes() == bad and not marker.exists()
    assert "weights_only" not in err  # never relay torch's advice to load untrusted files unsafely


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_load_model_state_names_the_mismatch():
    small = build_model(smoke_config(Path("."), **{"model.depth": 2}).model)
    big = build_model(smoke_config(Path("."), **{"model.depth": 3, "model.embed_dim": 64}).model)
    with pytest.raises(CheckpointError, match=r"different model \(unexpected \['blocks.2") as e:
        load_model_state(small, big.state_dict(), "ckpt.pt")
    assert "shape mismatch" in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.slow
def test_full_disk_during_a_checkpoint(fake_cifar, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    good = _finished_part(fake_cifar, out, capsys)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_main(capsys, *train_args(fake_cifar, out, "--resume"))
    assert code == 2
    assert_one_error(err, f"could not write {out / 'checkpoint.pt'}: No space left on device")
    assert "free some disk space" in err and "--resume" in err
    assert (out / "checkpoint.pt").read_bytes() == good and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    assert main(train_args(fake_cifar, out, "--resume")) == 0  # space freed: the run continues from step 9
    assert load_checkpoint(out)["step"] == 18


@pytest.mark.slow
def test_full_disk_while_logging(fake_cifar, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    real_log = Records.log

    def log(self, step, **values):
        if step == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "metrics.jsonl"))
        real_log(self, step, **values)

    monkeypatch.setattr(Records, "log", log)
    code, err = run_main(capsys, *train_args(fake_cifar, out, "train.log_every_steps=1"))
    assert code == 2
    assert_one_error(err, f"{out / 'metrics.jsonl'}: No space left on device")
    assert "--resume" in err
