"""Using a trained model: eval on any ablation, predict on image files, export, inspect; SVHN and image folders."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import smallvit
from conftest import make_images, smoke_config, use_checksums
from smallvit import data as D
from smallvit.backbones import build_model
from smallvit.cli import main
from smallvit.config import ConfigError, to_dict
from smallvit.datasets import DATASETS
from smallvit.experiments import make_config
from smallvit.evaluate import evaluate_run, predict_logits
from smallvit.export import max_abs_diff, run_exported
from smallvit.inspect_attn import attention_maps, figure_size_px, rollout
from smallvit.runs import save_checkpoint

MULTI = {"model.num_cls_tokens": 2, "model.class_attn_depth": 1}  # several CLS tokens + a class-attention block
TINY = {"train.max_steps": 3, "aug.autoaugment": "none", "aug.erase_p": 0.0}


@pytest.fixture(scope="module")
def run(cifar, tmp_path_factory):
    """One tiny trained run with two CLS tokens and a class-attention block."""
    out = tmp_path_factory.mktemp("runs") / "cls2-ca1"
    smallvit.train(smoke_config(cifar, **MULTI, **TINY), out)
    return out


def _test_batch(cifar, n=7):
    x, y = D.load("cifar10", str(cifar), download=False, train=False)
    return x[:n], y[:n]


def _json(text: str):
    return json.loads(text[min(i for i in (text.find("{"), text.find("[")) if i >= 0):])


# ---- eval


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


def test_cli_eval_multi_cls_class_attention(run, cifar, capsys):
    assert main(["eval", str(run), "--tta-flip"]) == 0
    report = _json(capsys.readouterr().out)
    assert report["n"] == 64 and len(report["per_class_acc"]) == 10 and (run / "confusion.png").is_file()


# ---- predict


def test_predict_png_and_jpeg_of_any_size(run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    files = []
    for name, size, mode in [("a.png", (45, 27), "RGB"), ("b.jpg", (50, 61), "RGB"), ("c.png", (17, 17), "L"),
                             ("d.png", (32, 32), "RGBA")]:
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if mode == "L" else arr).save(tmp_path / name)
        files.append(str(tmp_path / name))
    assert main(["predict", str(run), *files, "--topk", "3", "--json"]) == 0
    out = _json(capsys.readouterr().out)
    assert [r["image"] for r in out] == files
    for r in out:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] == DATASETS["cifar10"].class_names[t["index"]] for t in r["top"])
    assert main(["predict", str(run), files[0], "--topk", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "rank", "class", "prob"] and len(table) == 3 and files[0] in table[1]
    (tmp_path / "x.png").write_text("not an image")
    assert main(["predict", str(run), str(tmp_path / "x.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_load_api_matches_evaluation(run, cifar, tmp_path):
    model, preprocess, names = smallvit.load(run)
    assert not model.training and names == DATASETS["cifar10"].class_names
    x, _ = _test_batch(cifar, 3)
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(tmp_path / "t.png")  # lossless: the same pixels
    p = smallvit.load(run)
    info = DATASETS["cifar10"]
    want = predict_logits(model, x, info.mean, info.std)
    torch.testing.assert_close(p.logits(tmp_path / "t.png"), want[:1])
    torch.testing.assert_close(p.logits(x), want)  # a uint8 batch tensor
    assert preprocess(Image.open(tmp_path / "t.png")).shape == (1, 3, 32, 32)
    odd = torch.randint(0, 256, (3, 45, 27), dtype=torch.uint8)  # resized on the same path as a PIL image
    torch.testing.assert_close(preprocess(odd), preprocess(Image.fromarray(odd.permute(1, 2, 0).numpy())))
    top = p.topk(x, k=20)
    assert len(top) == 3 and len(top[0]) == 10 and top[0][0][1] >= top[0][1][1]


# ---- export


def test_export_onnx_gives_the_same_logits(run, cifar, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (the test extra)")
    pytest.importorskip("onnx", reason="the opset is read with onnx (the test extra)")
    f = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(f)]) == 0
    report = _json(capsys.readouterr().out)
    assert report["max_abs_diff"] <= 1e-4 and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
    model, preprocess, names = smallvit.load(run)
    x, _ = _test_batch(cifar, 7)  # another batch size than the export's example: the batch axis is dynamic
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


def test_export_legacy_onnx_torchscript_and_torch_export(run, cifar, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX export is checked with onnxruntime (the test extra)")
    model, preprocess, _ = smallvit.load(run)
    xb = preprocess(_test_batch(cifar, 5)[0])
    f = tmp_path / "legacy.onnx"
    args = ["--out", str(f), "--onnx-exporter", "torchscript", "--opset", "17"]
    assert main(["export", str(run), "--format", "onnx", *args]) == 0
    assert max_abs_diff(model, f, "onnx", xb) <= 1e-4
    capsys.readouterr()
    for fmt in ("torchscript", "torch.export"):
        assert main(["export", str(run), "--format", fmt]) == 0
        report = _json(capsys.readouterr().out)
        assert report["max_abs_diff"] <= 1e-4
        assert max_abs_diff(model, report["file"], fmt, xb) <= 1e-4
    assert (run / "model.torchscript.pt").is_file() and (run / "model.pt2.json").is_file()


# ---- inspect


def test_inspect_writes_grids_of_the_expected_size(run, tmp_path, capsys):
    out = tmp_path / "attn"
    assert main(["inspect", str(run), "--indices", "0,3", "--out", str(out)]) == 0
    report = _json(capsys.readouterr().out)
    assert report["indices"] == [0, 3] and len(report["files"]) == 3
    layers, heads, cls = 2 + 1, 2, 2  # smoke depth 2 + one class-attention block; 2 heads; 2 CLS tokens
    assert Image.open(out / "attn_3.png").size == figure_size_px(layers * cls, heads + 2, header=True)
    assert Image.open(out / "rollout.png").size == figure_size_px(2 * cls, 3)
    assert main(["inspect", str(run), "--images", "1"]) == 0
    assert (run / "attention" / "attn_0.png").is_file()
    assert main(["inspect", str(run), "--indices", "9999"]) == 2


def test_attention_hooks_leave_the_model_unchanged_and_rollout_is_stochastic():
    cfg = make_config("smoke", {**MULTI, "model.class_attn": "cait"})
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


# ---- datasets beyond CIFAR-10


def _write_svhn(root, n_train=96, n_test=40):
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True)
    x, y = make_images(n_train + n_test, 3)
    sums = {}
    for name, sl in (("train_32x32.mat", slice(0, n_train)), ("test_32x32.mat", slice(n_train, None))):
        lab = np.where(y[sl] == 0, 10, y[sl]).astype(np.uint8)[:, None]  # the official files write 0 as 10
        savemat(folder / name, {"X": x[sl].transpose(2, 3, 1, 0), "y": lab})
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return x, y, sums


def test_svhn_reads_the_official_mat_files(tmp_path, monkeypatch):
    x, y, sums = _write_svhn(tmp_path)
    with pytest.raises(D.DataError, match="train_32x32.mat has md5"):
        D.load("svhn", str(tmp_path), download=False)  # the official checksums refuse the fake files
    use_checksums(monkeypatch, "svhn", sums)
    xs, ys = D.load("svhn", str(tmp_path), download=False, train=True)
    assert xs.shape == (96, 3, 32, 32) and xs.dtype == torch.uint8
    assert torch.equal(xs, torch.from_numpy(x[:96])) and torch.equal(ys, torch.from_numpy(y[:96]))
    xt, yt = D.load("svhn", str(tmp_path / "svhn"), download=False, train=False)  # the folder itself works too
    assert xt.shape == (40, 3, 32, 32) and yt.min() >= 0 and yt.max() <= 9
    with pytest.raises(D.DataError, match="ufldl.stanford.edu"):
        D.load("svhn", str(tmp_path / "none"), download=False)


def test_svhn_end_to_end(tmp_path, monkeypatch, capsys):
    _, _, sums = _write_svhn(tmp_path / "data")
    use_checksums(monkeypatch, "svhn", sums)
    cfg = make_config("svhn", {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2, "train.epochs": 2,
                               "optim.warmup_epochs": 1, "train.batch_size": 32, "train.max_steps": 2,
                               "train.progress": False, "data.data_dir": str(tmp_path / "data"),
                               "data.download": False})
    assert cfg.aug.autoaugment == "svhn" and not cfg.aug.flip and cfg.data.dataset == "svhn"
    r = smallvit.train(cfg, tmp_path / "run")
    assert r["step"] == 2
    report = evaluate_run(tmp_path / "run", device="cpu")
    assert report["dataset"] == "svhn" and report["n"] == 40
    assert smallvit.load(tmp_path / "run").preprocess.mean.tolist() == pytest.approx(DATASETS["svhn"].mean)


def _write_folder(root, classes=("dog", "cat", "bird"), n_train=4, n_val=2):
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = 20 + 7 * i, 30 + 3 * ci  # odd sizes, resized on load
                arr = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                arr[..., ci] += 150
                ext = ".jpg" if i == 1 else ".png"
                Image.fromarray(arr).convert("L" if i == 2 else "RGB").save(root / split / c / f"{i}{ext}")


def test_image_folder_dataset(tmp_path):
    _write_folder(tmp_path)
    x, y, classes = D.load_folder(tmp_path, "train", 16)
    assert classes == ("bird", "cat", "dog") and x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    xv, yv = D.load("folder", str(tmp_path), train=False, img_size=16)
    assert xv.shape == (6, 3, 16, 16) and yv.tolist() == [0, 0, 1, 1, 2, 2]
    meta = D.dataset_meta("folder", str(tmp_path), 16)
    xf = x.double() / 255
    assert meta.num_classes == 3 and meta.class_names == classes
    assert meta.mean == pytest.approx(xf.mean((0, 2, 3)).tolist(), abs=1e-4)
    assert meta.std == pytest.approx(xf.transpose(0, 1).reshape(3, -1).std(1).tolist(), abs=1e-4)
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    assert D.dataset_meta("folder", str(tmp_path), 16).std == (0.25, 0.25, 0.25)  # given statistics win
    (tmp_path / "val" / "fish").mkdir()
    with pytest.raises(D.DataError, match="fish"):
        D.load("folder", str(tmp_path), train=False)
    with pytest.raises(D.DataError, match="train/<class>"):
        D.load("folder", str(tmp_path / "nowhere"))


def test_image_folder_end_to_end(tmp_path, capsys):
    _write_folder(tmp_path / "pets")
    over = {**TINY, "data.dataset": "folder", "model.img_size": 16, "model.num_classes": 3, "train.batch_size": 4,
            "train.max_steps": 2}
    with pytest.raises(ConfigError, match="3 classes"):
        smallvit.train(smoke_config(tmp_path / "pets", **{**over, "model.num_classes": 10}), tmp_path / "bad")
    r = smallvit.train(smoke_config(tmp_path / "pets", **over), tmp_path / "run")
    assert r["step"] == 2
    p = smallvit.load(tmp_path / "run")
    assert p.class_names == ("bird", "cat", "dog") and p.preprocess.img_size == 16
    img = str(tmp_path / "pets" / "val" / "cat" / "1.jpg")
    assert main(["predict", str(tmp_path / "run"), img, "--json"]) == 0
    assert {t["class"] for t in _json(capsys.readouterr().out)[0]["top"]} == {"bird", "cat", "dog"}


def test_dataset_presets_and_names():
    assert make_config("cifar100").model.num_classes == 100 and make_config("cifar100").data.dataset == "cifar100"
    svhn = make_config("svhn")
    assert (svhn.data.dataset, svhn.aug.autoaugment, svhn.aug.flip) == ("svhn", "svhn", False)
    with pytest.raises(ConfigError, match="data.dataset"):
        make_config("smoke", {"data.dataset": "imagenet"})
    names = DATASETS["cifar100"].class_names
    assert len(names) == len(set(names)) == 100 and list(names) == sorted(names)
    assert D.dataset_meta("cifar100").class_names[:3] == ("apple", "aquarium_fish", "baby")


def test_version_and_python_dash_m():
    import subprocess
    import sys

    from smallvit import __version__

    out = subprocess.run([sys.executable, "-m", "smallvit", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"smallvit {__version__}"
    out = subprocess.run([sys.executable, "-m", "smallvit", "ablations"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "mla-qkv" in out.stdout
