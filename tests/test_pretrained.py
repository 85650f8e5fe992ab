"""train.init_from (pretrained.py): a smallvit run, a timm state dict, a DINO checkpoint; resized position
embeddings, reinitialised heads, and one clear error for what cannot be loaded."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

import smallvit
from conftest import SHORT_RUN, make_images, smoke_config, smoke_model, use_checksums
from smallvit.backbones import build_model
from smallvit.cli import main
from smallvit.config import apply_overrides
from smallvit.experiments import make_config
from smallvit.pretrained import init_from, smallvit_to_timm, timm_to_smallvit
from smallvit.runs import CheckpointError


def _timm_vit(img_size=32, num_classes=10, **kw):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=img_size, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
                num_classes=num_classes, global_pool="token")
    return VisionTransformer(**{**args, **kw}).eval()


def _write_fake_cifar100(root: Path) -> dict[str, str]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    sums = {}
    for name, n, seed in (("train", 320, 1), ("test", 64, 2)):
        x, y = make_images(n, seed)
        (folder / name).write_bytes(pickle.dumps({b"data": x.reshape(n, -1), b"fine_labels": (y * 7).tolist()}))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return sums


@pytest.mark.slow
def test_cifar10_run_to_cifar100_model(timm_run, tmp_path, monkeypatch, capsys):
    use_checksums(monkeypatch, "cifar100", _write_fake_cifar100(tmp_path / "data"))
    src = torch.load(timm_run / "checkpoint.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    model = smoke_model(**{"data.dataset": "cifar100", "model.num_classes": 100})
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = init_from(model, timm_run)
    assert report["reinitialised"] == ["head.bias", "head.weight"] and not report["missing"] + report["unexpected"]
    for k, v in model.state_dict().items():  # the rest equal to the CIFAR-10 run, the head as initialised
        torch.testing.assert_close(v, head[k] if k.startswith("head.") else src[k], rtol=0, atol=0)
    # the same through training: the report is printed and saved, and the run trains
    out = tmp_path / "c100"
    cfg = smoke_config(tmp_path / "data", **{**SHORT_RUN, "data.dataset": "cifar100", "model.num_classes": 100,
                                             "train.init_from": str(timm_run)})
    result = smallvit.train(cfg, out)
    saved = json.loads((out / "init_report.json").read_text())
    assert saved["reinitialised"] == ["head.bias", "head.weight"] and len(saved["loaded"]) == len(src) - 2
    assert "init_from:" in capsys.readouterr().out and result["step"] == 3
    # --resume is unchanged: the weights come from the checkpoint, init_from is not read again
    (timm_run / "checkpoint.pt").rename(timm_run / "moved.pt")
    try:
        assert smallvit.train(apply_overrides(cfg, {"train.max_steps": 5}), out, resume=True)["step"] == 5
    finally:
        (timm_run / "moved.pt").rename(timm_run / "checkpoint.pt")


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
    model = smoke_model(**{"model.drop_path": 0.0})
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
    model = smoke_model()
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
        model = smoke_model()
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
            init_from(smoke_model(), path)
    torch.save({"note": "no tensors here"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        init_from(smoke_model(), tmp_path / "empty.pth")
    torch.save({"model": _Unsafe()}, tmp_path / "unsafe.pth")  # a pickle the weights-only reader refuses
    with pytest.raises(CheckpointError, match="may be unsafe") as e:
        init_from(smoke_model(), tmp_path / "unsafe.pth")
    assert "weights_only" not in str(e.value)  # never relay torch's advice to load such a file unsafely


class _Unsafe:
    """An object only a full (code-running) unpickler would rebuild."""


@pytest.mark.slow
def test_other_shape_mismatches_need_init_strict_false(timm_run):
    wide = smoke_model(**{"model.mlp_ratio": 4.0})
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatch blocks.0.mlp.fc1.weight"):
        init_from(wide, timm_run)
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())  # nothing half-loaded
    report = init_from(wide, timm_run, strict=False)
    assert {m["key"] for m in report["mismatched"]} == {f"blocks.{i}.mlp.{p}" for i in range(2)
                                                         for p in ("fc1.weight", "fc1.bias", "fc2.weight")}
    assert "blocks.0.attn.q.weight" in report["loaded"]
    with pytest.raises(CheckpointError, match="no tensor matches"):
        init_from(smoke_model(**{"model.embed_dim": 16, "model.num_heads": 2, "model.patch_size": 8}), timm_run,
                  strict=False)
