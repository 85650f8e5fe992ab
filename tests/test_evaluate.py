"""`smallvit eval` (evaluate.py) on any ablation's checkpoint, with flip TTA and a confusion plot."""

import pytest
import torch

from conftest import json_out
from smallvit import data as D
from smallvit.backbones import build_model
from smallvit.cli import main
from smallvit.config import to_dict
from smallvit.datasets import DATASETS
from smallvit.evaluate import evaluate_run, predict_logits
from smallvit.experiments import make_config
from smallvit.runs import save_checkpoint


@pytest.mark.parametrize("ablation", ["sin", "cls4-ca2", "cls4-ca2-cait", "cls4-mean", "mla-kv-shared", "whiten"])
def test_eval_any_ablation_checkpoint(cifar, tmp_path, ablation):
    low_rank = {"model.latent_dim": 16} if ablation.startswith("mla") else {}  # narrower than smoke's 32 channels
    cfg = make_config("smoke", {"data.data_dir": str(cifar), "data.download": False, **low_rank}, ablation=ablation)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "config": to_dict(cfg)})
    report = evaluate_run(tmp_path / "ckpt.pt", tta_flip=True, device="cpu")
    x, y = D.load("cifar10", str(cifar), download=False, train=False)
    info = DATASETS["cifar10"]
    acc = 100.0 * (predict_logits(model, x, info.mean, info.std).argmax(1) == y).float().mean().item()
    assert report["n"] == 64 and report["test_acc"] == pytest.approx(acc)
    assert "test_acc_tta_flip" in report and (tmp_path / "confusion.png").is_file()


@pytest.mark.slow
def test_cli_eval_multi_cls_class_attention(multi_cls_run, cifar, capsys):
    assert main(["eval", str(multi_cls_run), "--tta-flip"]) == 0
    report = json_out(capsys.readouterr().out)
    assert report["n"] == 64 and len(report["per_class_acc"]) == 10 and (multi_cls_run / "confusion.png").is_file()
