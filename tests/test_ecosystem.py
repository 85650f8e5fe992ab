"""Fitting the ecosystem: W&B logging, `smallvit profile`, train.init_from, export to timm and safetensors."""

import hashlib
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

import smallvit
from conftest import make_images, smoke_config, use_checksums, write_fake_cifar10
from smallvit.backbones import build_model
from smallvit.cli import main
from smallvit.config import ConfigError, apply_overrides, to_dict
from smallvit.datasets import DATASETS
from smallvit.experiments import make_config
from smallvit.export import ExportError, export
from smallvit.pretrained import init_from, smallvit_to_timm, timm_to_smallvit
from smallvit.runs import CheckpointError, read_metrics, save_checkpoint
from smallvit.wandb_log import metric_name

TINY = {"train.max_steps": 3, "aug.autoaugment": "none", "aug.erase_p": 0.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny trained baseline-shaped run (one CLS token, full-rank q/k/v: what timm can express)."""
    data = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        use_checksums(mp, "cifar10", write_fake_cifar10(data, n_train=320, n_test=64))
        out = tmp_path_factory.mktemp("runs") / "base"
        smallvit.train(smoke_config(data, **TINY), out)
    return out


def _timm_vit(img_size=32, num_classes=10, **kw):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=img_size, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
                num_classes=num_classes, global_pool="token")
    return VisionTransformer(**{**args, **kw}).eval()


def _model(**overrides):
    return build_model(make_config("smoke", overrides).model).eval()


# ---- W&B


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


# ---- train.init_from


def _write_fake_cifar100(root: Path) -> dict[str, str]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    sums = {}
    for name, n, seed in (("train", 320, 1), ("test", 64, 2)):
        x, y = make_images(n, seed)
        (folder / name).write_bytes(pickle.dumps({b"data": x.reshape(n, -1), b"fine_labels": (y * 7).tolist()}))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return sums


def test_cifar10_run_to_cifar100_model(run, tmp_path, monkeypatch, capsys):
    use_checksums(monkeypatch, "cifar100", _write_fake_cifar100(tmp_path / "data"))
    src = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    model = _model(**{"data.dataset": "cifar100", "model.num_classes": 100})
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = init_from(model, run)
    assert report["reinitialised"] == ["head.bias", "head.weight"] and not report["missing"] + report["unexpected"]
    for k, v in model.state_dict().items():  # the rest equal to the CIFAR-10 run, the head as initialised
        torch.testing.assert_close(v, head[k] if k.startswith("head.") else src[k], rtol=0, atol=0)
    # the same through training: the report is printed and saved, and the run trains
    out = tmp_path / "c100"
    cfg = smoke_config(tmp_path / "data", **{**TINY, "data.dataset": "cifar100", "model.num_classes": 100,
                                             "train.init_from": str(run)})
    result = smallvit.train(cfg, out)
    saved = json.loads((out / "init_report.json").read_text())
    assert saved["reinitialised"] == ["head.bias", "head.weight"] and len(saved["loaded"]) == len(src) - 2
    assert "init_from:" in capsys.readouterr().out and result["step"] == 3
    # --resume is unchanged: the weights come from the checkpoint, init_from is not read again
    (run / "checkpoint.pt").rename(run / "moved.pt")
    try:
        assert smallvit.train(apply_overrides(cfg, {"train.max_steps": 5}), out, resume=True)["step"] == 5
    finally:
        (run / "moved.pt").rename(run / "checkpoint.pt")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_gives_equal_logits(tmp_path, suffix):
    torch.manual_seed(1)
    tm = _timm_vit()
    f = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tm.state_dict(), str(f))
    else:
        torch.save(tm.state_dict(), f)
    model = _model(**{"model.drop_path": 0.0})
    report = init_from(model, f)
    assert report["format"] == "timm" and not report["missing"] + report["unexpected"] + report["reinitialised"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tm(x), atol=1e-5, rtol=0)
    assert timm_to_smallvit(smallvit_to_timm(model.state_dict())).keys() == model.state_dict().keys()


def test_position_embedding_is_resized_bicubic_with_the_cls_row_kept(tmp_path):
    tm = _timm_vit(img_size=64)  # a 16x16 grid -> smallvit's 8x8
    with torch.no_grad():
        tm.pos_embed[:, 0] = 5.0
        tm.pos_embed[:, 1:] = torch.arange(32.0)  # the same vector at every grid position
    torch.save({"state_dict": tm.state_dict()}, tmp_path / "vit64.pth")
    model = _model()
    report = init_from(model, tmp_path / "vit64.pth")
    assert report["reshaped"] == [{"key": "pos_embed", "from": [1, 257, 32], "to": [1, 65, 32]}]
    assert (model.pos_embed[0, 0] == 5.0).all()  # the CLS row as it was
    torch.testing.assert_close(model.pos_embed[0, 1:], torch.arange(32.0).expand(64, 32))  # bicubic keeps constants


def test_dino_checkpoint_takes_the_teacher_backbone(tmp_path):
    torch.manual_seed(2)
    teacher, student = (build_model(make_config("smoke", {"model.num_classes": 0}).model) for _ in range(2))
    dino_head = {"head.mlp.0.weight": torch.randn(64, 32), "head.last_layer.weight": torch.randn(256, 64)}
    wrap = lambda m, prefix: {**{prefix + "backbone." + k: v for k, v in m.state_dict().items()},
                              **{prefix + k: v for k, v in dino_head.items()}}
    # The original DINO layout (DDP "module." prefixes) and `smallvit pretrain`'s run folder (with a config)
    torch.save({"teacher": wrap(teacher, "module."), "student": wrap(student, "module."), "epoch": 3},
               tmp_path / "dino.pth")
    (tmp_path / "pretrain").mkdir()
    torch.save({"teacher": wrap(teacher, ""), "student": wrap(student, ""), "config": {"model": {}}},
               tmp_path / "pretrain" / "checkpoint.pt")
    for source in (tmp_path / "dino.pth", tmp_path / "pretrain"):
        model = _model()
        report = init_from(model, source)
        assert report["format"] == "teacher" and report["reinitialised"] == ["head.bias", "head.weight"]
        assert not report["unexpected"] + report["missing"]  # the DINO projection head is dropped
        for k, v in teacher.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_bad_init_file_is_a_clear_error_and_nothing_is_written(fake_cifar, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "run"
    args = ["train", "--preset", "smoke", "--out", str(out), "--set", f"data.data_dir={fake_cifar}",
            "data.download=false", "data.subset=0", "data.test_subset=0", "train.threads=1", f"train.init_from={bad}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be read as weights" in err and "Traceback" not in err
    assert not out.exists()
    for path, msg in ((tmp_path / "absent.pth", "no file"), (tmp_path, "no file")):
        with pytest.raises(CheckpointError, match=msg):
            init_from(_model(), path)
    torch.save({"note": "no tensors here"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        init_from(_model(), tmp_path / "empty.pth")
    torch.save({"model": _Unsafe()}, tmp_path / "unsafe.pth")  # a pickle the weights-only reader refuses
    with pytest.raises(CheckpointError, match="may be unsafe") as e:
        init_from(_model(), tmp_path / "unsafe.pth")
    assert "weights_only" not in str(e.value)  # never relay torch's advice to load such a file unsafely


class _Unsafe:
    """An object only a full (code-running) unpickler would rebuild."""


def test_other_shape_mismatches_need_init_strict_false(run):
    wide = _model(**{"model.mlp_ratio": 4.0})
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatch blocks.0.mlp.fc1.weight"):
        init_from(wide, run)
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())  # nothing half-loaded
    report = init_from(wide, run, strict=False)
    assert {m["key"] for m in report["mismatched"]} == {f"blocks.{i}.mlp.{p}" for i in range(2)
                                                         for p in ("fc1.weight", "fc1.bias", "fc2.weight")}
    assert "blocks.0.attn.q.weight" in report["loaded"]
    with pytest.raises(CheckpointError, match="no tensor matches"):
        init_from(_model(**{"model.embed_dim": 16, "model.num_heads": 2, "model.patch_size": 8}), run, strict=False)


# ---- export


def test_export_timm_folder_loads_in_timm_offline(run, tmp_path, monkeypatch, capsys):
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "timm-model"
    assert main(["export", str(run), "--format", "timm", "--out", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert report["max_abs_diff"] <= 1e-5
    tm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    model, _, names = smallvit.load(run)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), model(x), atol=1e-5, rtol=0)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_classes"] == 10 and cfg["label_names"] == list(names)
    data = timm.data.resolve_data_config({}, model=tm)
    # tuple(): timm 1.0.28 gives config.json's list
    assert tuple(data["input_size"]) == (3, 32, 32) and data["mean"] == pytest.approx(DATASETS["cifar10"].mean)
    assert data["std"] == pytest.approx(DATASETS["cifar10"].std)


@pytest.mark.parametrize("ablation, reason", [("mla-q", "low-rank"), ("cls2", "2 CLS tokens"),
                                              ("cls1-ca2", "class-attention")])
def test_export_timm_refuses_what_timm_cannot_express(tmp_path, ablation, reason):
    low_rank = {"model.latent_dim": 16} if ablation.startswith("mla") else {}  # narrower than smoke's 32 channels
    cfg = make_config("smoke", low_rank, ablation=ablation)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)})
    with pytest.raises(ExportError, match=reason):
        export(tmp_path / "ckpt.pt", "timm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_export_safetensors_loads_back_in_smallvit_and_init_from(run, tmp_path, capsys):
    f = tmp_path / "w.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] == 0.0
    model, _, names = smallvit.load(run)
    back, _, back_names = smallvit.load(f)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    assert back_names == names
    fresh = _model()
    assert init_from(fresh, f)["format"] == "state dict" and len(init_from(fresh, f)["loaded"]) == len(
        fresh.state_dict())


# ---- profile


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
