"""Prediction (predict.py): `smallvit predict` on image files of any size, and the load() API's preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

import smallvit
from conftest import cifar_test_images, json_out
from smallvit.cli import main
from smallvit.datasets import DATASETS
from smallvit.evaluate import predict_logits

pytestmark = pytest.mark.slow  # on a trained run (the multi_cls_run fixture trains it)


def test_predict_png_and_jpeg_of_any_size(multi_cls_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    files = []
    for name, size, mode in [("a.png", (45, 27), "RGB"), ("b.jpg", (50, 61), "RGB"), ("c.png", (17, 17), "L"),
                             ("d.png", (32, 32), "RGBA")]:
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if mode == "L" else arr).save(tmp_path / name)
        files.append(str(tmp_path / name))
    assert main(["predict", str(multi_cls_run), *files, "--topk", "3", "--json"]) == 0
    out = json_out(capsys.readouterr().out)
    assert [r["image"] for r in out] == files
    for r in out:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] == DATASETS["cifar10"].class_names[t["index"]] for t in r["top"])
    assert main(["predict", str(multi_cls_run), files[0], "--topk", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "rank", "class", "prob"] and len(table) == 3 and files[0] in table[1]
    (tmp_path / "x.png").write_text("not an image")
    assert main(["predict", str(multi_cls_run), str(tmp_path / "x.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_load_api_matches_evaluation(multi_cls_run, cifar, tmp_path):
    model, preprocess, names = smallvit.load(multi_cls_run)
    assert not model.training and names == DATASETS["cifar10"].class_names
    x, _ = cifar_test_images(cifar, 3)
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(tmp_path / "t.png")  # lossless: the same pixels
    p = smallvit.load(multi_cls_run)
    info = DATASETS["cifar10"]
    want = predict_logits(model, x, info.mean, info.std)
    torch.testing.assert_close(p.logits(tmp_path / "t.png"), want[:1])
    torch.testing.assert_close(p.logits(x), want)  # a uint8 batch tensor
    assert preprocess(Image.open(tmp_path / "t.png")).shape == (1, 3, 32, 32)
    odd = torch.randint(0, 256, (3, 45, 27), dtype=torch.uint8)  # resized on the same path as a PIL image
    torch.testing.assert_close(preprocess(odd), preprocess(Image.fromarray(odd.permute(1, 2, 0).numpy())))
    top = p.topk(x, k=20)
    assert len(top) == 3 and len(top[0]) == 10 and top[0][0][1] >= top[0][1][1]
