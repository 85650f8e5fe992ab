"""Export (export.py): to timm (a local folder timm loads offline; refused where timm cannot express the model),
safetensors, ONNX (dynamo and the legacy exporter), TorchScript and torch.export, each giving the same logits."""

import json

import pytest
import torch

import smallvit
from conftest import cifar_test_images, json_out, seeded_vit, smoke_model
from smallvit.backbones import build_model
from smallvit.cli import main
from smallvit.config import to_dict
from smallvit.datasets import DATASETS
from smallvit.experiments import make_config
from smallvit.export import ExportError, export, max_abs_diff, run_exported
from smallvit.pretrained import init_from
from smallvit.runs import save_checkpoint


def test_gap_model_exports_to_timm_average_pooling():
    from smallvit.export import to_timm

    model = seeded_vit(**{"model.num_cls_tokens": 0}).eval()
    tm = to_timm(model)
    assert tm.global_pool == "avg" and tm.cls_token is None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_export_timm_folder_loads_in_timm_offline(timm_run, tmp_path, monkeypatch, capsys):
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "timm-model"
    assert main(["export", str(timm_run), "--format", "timm", "--out", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert report["max_abs_diff"] <= 1e-5
    tm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    model, _, names = smallvit.load(timm_run)
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


@pytest.mark.slow
def test_export_safetensors_loads_back_in_smallvit_and_init_from(timm_run, tmp_path, capsys):
    f = tmp_path / "w.safetensors"
    assert main(["export", str(timm_run), "--format", "safetensors", "--out", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] == 0.0
    model, _, names = smallvit.load(timm_run)
    back, _, back_names = smallvit.load(f)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    assert back_names == names
    fresh = smoke_model()
    assert init_from(fresh, f)["format"] == "state dict" and len(init_from(fresh, f)["loaded"]) == len(
        fresh.state_dict())


@pytest.mark.slow
def test_export_onnx_gives_the_same_logits(multi_cls_run, cifar, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (the test extra)")
    pytest.importorskip("onnx", reason="the opset is read with onnx (the test extra)")
    f = tmp_path / "m.onnx"
    assert main(["export", str(multi_cls_run), "--format", "onnx", "--out", str(f)]) == 0
    report = json_out(capsys.readouterr().out)
    assert report["max_abs_diff"] <= 1e-4 and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
    model, preprocess, names = smallvit.load(multi_cls_run)
    x, _ = cifar_test_images(cifar, 7)  # another batch size than the export's example: the batch axis is dynamic
    xb = preprocess(x)
    with torch.no_grad():
        want = model(xb)
    torch.testing.assert_close(run_exported(f, "onnx", xb), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(run_exported(f, "onnx", xb[:1]), want[:1], atol=1e-4, rtol=0)
    import onnx

    m = onnx.load(str(f))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["class_names"] == list(names) and side["mean"] == list(DATASETS["cifar10"].mean)


@pytest.mark.slow
def test_export_legacy_onnx_torchscript_and_torch_export(multi_cls_run, cifar, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (the test extra)")
    model, preprocess, _ = smallvit.load(multi_cls_run)
    xb = preprocess(cifar_test_images(cifar, 5)[0])
    f = tmp_path / "legacy.onnx"
    args = ["--out", str(f), "--onnx-exporter", "torchscript", "--opset", "17"]
    assert main(["export", str(multi_cls_run), "--format", "onnx", *args]) == 0
    assert max_abs_diff(model, f, "onnx", xb) <= 1e-4
    capsys.readouterr()
    for fmt in ("torchscript", "torch.export"):
        assert main(["export", str(multi_cls_run), "--format", fmt]) == 0
        report = json_out(capsys.readouterr().out)
        assert report["max_abs_diff"] <= 1e-4
        assert max_abs_diff(model, report["file"], fmt, xb) <= 1e-4
    assert (multi_cls_run / "model.torchscript.pt").is_file() and (multi_cls_run / "model.pt2.json").is_file()
