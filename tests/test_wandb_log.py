"""W&B logging (wandb_log.py): offline records equal metrics.jsonl, resume continues the run."""

import json
import sys
from pathlib import Path

import pytest

import smallvit
from conftest import smoke_config
from smallvit.config import ConfigError
from smallvit.runs import read_metrics
from smallvit.wandb_log import metric_name


def _wandb_records(path: Path):
    """Records of a .wandb file: wandb's protobuf Records in LevelDB-log framing (7-byte file header; each chunk
    has a 7-byte header crc32/length/type, 1 = full, 2-4 = first/middle/last; 32 KiB blocks, short tails padded).
    wandb >= 0.2x no longer ships a Python reader of its own (its writer is the Go core)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind == 0:
            break
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r
            buf = b""


def _wandb_history(run_dir: Path) -> tuple[list[str], dict[int, dict], list]:
    ids, history, runs = [], {}, []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.append(r.run.run_id)
                runs.append(r.run)
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(row["_step"], {}).update(row)
    return ids, history, runs


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


@pytest.mark.slow
def test_wandb_offline_gets_every_record_and_resume_continues_the_run(fake_cifar, tmp_path, wandb_offline):
    out = tmp_path / "run"
    keys = {"train.wandb_project": "smallvit-test", "train.wandb_tags": "ci,smoke", "aug.autoaugment": "none"}
    smallvit.train(smoke_config(fake_cifar, **keys, **{"train.max_steps": 9}), out)  # 9 steps per epoch: eval at 9
    smallvit.train(smoke_config(fake_cifar, **keys), out, resume=True)  # to the end (step 18)
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    ids, history, runs = _wandb_history(out)
    assert ids == [run_id, run_id]  # the resumed process wrote into the same W&B run
    assert list(runs[0].tags) == ["ci", "smoke"]
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["train"]["wandb_project"] == "smallvit-test" and config["model"]["embed_dim"] == 32
    rows = read_metrics(out)
    assert {r["step"] for r in rows} == set(history) and any("test_acc" in r for r in rows)
    for r in rows:  # every record, under W&B's names, with the same values
        for k, v in r.items():
            if k != "step":
                assert history[r["step"]][metric_name(k)] == pytest.approx(v), (r["step"], k)
    assert {"loss", "lr", "img_per_s", "epoch", "test/acc", "test/loss"} <= set().union(*history.values())


def test_wandb_names_evaluations_for_what_they_are():
    assert [metric_name(k) for k in ("val_acc", "val_loss", "test_acc", "loss", "img_per_s", "train_seconds")] == [
        "val/acc", "val/loss", "test/acc", "loss", "img_per_s", "train_seconds"]


def test_wandb_missing_is_a_clear_error_before_anything_is_written(fake_cifar, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec answers None
    with pytest.raises(ConfigError, match=r"pip install smallvit\[wandb\]"):
        smallvit.train(smoke_config(fake_cifar, **{"train.wandb_project": "p"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
