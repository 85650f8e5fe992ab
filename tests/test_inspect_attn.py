"""`smallvit inspect` (inspect_attn.py): attention maps, rollout, and the figures' sizes."""

import pytest
import torch
from PIL import Image

from conftest import MULTI_CLS, json_out
from smallvit.backbones import build_model
from smallvit.cli import main
from smallvit.experiments import make_config
from smallvit.inspect_attn import attention_maps, figure_size_px, rollout


@pytest.mark.slow
def test_inspect_writes_grids_of_the_expected_size(multi_cls_run, tmp_path, capsys):
    out = tmp_path / "attn"
    assert main(["inspect", str(multi_cls_run), "--indices", "0,3", "--out", str(out)]) == 0
    report = json_out(capsys.readouterr().out)
    assert report["indices"] == [0, 3] and len(report["files"]) == 3
    layers, heads, cls = 2 + 1, 2, 2  # smoke depth 2 + one class-attention block; 2 heads; 2 CLS tokens
    assert Image.open(out / "attn_3.png").size == figure_size_px(layers * cls, heads + 2, header=True)
    assert Image.open(out / "rollout.png").size == figure_size_px(2 * cls, 3)
    assert main(["inspect", str(multi_cls_run), "--images", "1"]) == 0
    assert (multi_cls_run / "attention" / "attn_0.png").is_file()
    assert main(["inspect", str(multi_cls_run), "--indices", "9999"]) == 2


def test_attention_hooks_leave_the_model_unchanged_and_rollout_is_stochastic():
    cfg = make_config("smoke", {**MULTI_CLS, "model.class_attn": "cait"})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    logits, maps = attention_maps(model, x)
    assert torch.equal(logits, want) and not model.blocks[0].attn._forward_pre_hooks
    N, K = 1 + 64, 2
    assert [n for n, _ in maps] == ["layer 1", "layer 2", "class-attn 1"]
    assert maps[0][1].shape == (3, 2, N + 1, N + 1) and maps[2][1].shape == (3, 2, K, N + 1)
    r = rollout([a for _, a in maps], K)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, N + 1))
    ident = [torch.eye(N + 1).expand(3, 2, N + 1, N + 1)] * 2
    torch.testing.assert_close(rollout(ident, K), torch.eye(N + 1).expand(3, N + 1, N + 1))
    # One uniform layer then identity: every token's rollout is half itself, half uniform.
    uni = torch.full((1, 1, 4, 4), 0.25)
    torch.testing.assert_close(rollout([uni], 1)[0], 0.5 * torch.eye(4) + 0.125)
