"""Calibration (calibration.py), CIFAR-10-C's corruptions (corruptions.py) and the evaluation suite (robustness.py):
metric values against hand-computed ones, temperature recovery, each corruption's bytes, the cache, the official
files' checks, and `smallvit eval` / `ablate --eval-suite` / `report` end to end on a tiny run."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import REAL_DATA, SHORT_RUN, json_out, make_images, needs_real_cifar, smoke_config, write_fake_cifar10
from smallvit import calibration as cal
from smallvit import corruptions as C
from smallvit import robustness as R

# ---- metrics


def _logits_with(conf: float, top: int, k: int = 10) -> torch.Tensor:
    """Logits whose softmax gives `conf` to class `top` and the rest evenly to the other k - 1."""
    p = torch.full((k,), (1 - conf) / (k - 1), dtype=torch.float64)
    p[top] = conf
    return p.log()


def test_ece_nll_brier_known_values():
    # Two groups away from bin edges (15 bins of 1/15): 100 images at confidence 0.85 of which 70 right, 50 at 0.35
    # of which 20 right. ECE = sum over bins of |accuracy - confidence| x share = (100 x 0.15 + 50 x 0.05) / 150.
    groups = [(0.85, 100, 70), (0.35, 50, 20)]
    logits, y = [], []
    for conf, n, right in groups:
        for i in range(n):
            logits.append(_logits_with(conf, 3))
            y.append(3 if i < right else 5)
    logits, y = torch.stack(logits).float(), torch.tensor(y)
    n = sum(g[1] for g in groups)
    ece = sum(abs(right / m - conf) * m for conf, m, right in groups) / n
    nll = sum(-right * math.log(conf) - (m - right) * math.log((1 - conf) / 9) for conf, m, right in groups) / n
    rest = lambda conf: (1 - conf) / 9  # noqa: E731
    brier = sum(right * ((1 - conf) ** 2 + 9 * rest(conf) ** 2)
                + (m - right) * (conf**2 + (1 - rest(conf)) ** 2 + 8 * rest(conf) ** 2)
                for conf, m, right in groups) / n
    s = cal.scores(logits, y)
    assert s["ece"] == pytest.approx(ece, abs=1e-5)
    assert s["nll"] == pytest.approx(nll, abs=1e-5)
    assert s["brier"] == pytest.approx(brier, abs=1e-5)
    assert s["acc"] == pytest.approx(100 * 90 / 150)
    assert [b[2] for b in cal.bins(logits, y)] == [0] * 5 + [50] + [0] * 6 + [100] + [0] * 2  # torchmetrics' bins


def test_perfectly_calibrated_logits_have_small_ece():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40000, 10, generator=g) * 2
    y = torch.multinomial(z.softmax(1), 1, generator=g).flatten()
    assert cal.scores(z, y)["ece"] < 0.01


def test_temperature_scaling_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 10, generator=g) * 2  # calibrated logits: labels drawn from their softmax
    y = torch.multinomial(z.softmax(1), 1, generator=g).flatten()
    for t_true in (0.5, 2.5):  # an under-confident and an over-confident model
        t = cal.fit_temperature(z * t_true, y)
        assert t == pytest.approx(t_true, rel=0.05)
        assert cal.scores(z * t_true / t, y)["ece"] < cal.scores(z * t_true, y)["ece"]


# ---- corruptions


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(make_images(12, 3)[0])


RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}


def test_every_corruption_of_the_reference_with_five_severities():
    assert C.NAMES == tuple(C.FUNCTIONS) and len(C.NAMES) == 15
    assert all(len(v) == 5 for v in C.PARAMS.values())


@pytest.mark.parametrize("name", C.NAMES)
def test_corruption_shape_dtype_determinism(images, name, one_thread):
    a = C.corrupt(images, name, 5, seed=0)
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert not torch.equal(a, images)  # severity 5 changes the images
    assert torch.equal(a, C.corrupt(images, name, 5, seed=0))  # same seed, same bytes
    assert torch.equal(a[:5], C.corrupt(images[:5], name, 5, seed=0))  # an image's bytes do not depend on N
    assert torch.equal(a, C.corrupt(images, name, 5, seed=1)) == (name not in RANDOM)  # seeds matter if random


def test_prefix_across_chunks(one_thread):
    x = torch.from_numpy(make_images(C.CHUNK + 4, 0)[0])
    full = C.corrupt(x, "gaussian_noise", 3, seed=7)
    assert torch.equal(full[C.CHUNK - 2 :], C.corrupt(x, "gaussian_noise", 3, seed=7)[C.CHUNK - 2 :])
    assert torch.equal(full[:3], C.corrupt(x[:3], "gaussian_noise", 3, seed=7))


def test_severity_moves_images_further_on_average(images, one_thread):
    dist = {s: np.mean([(C.corrupt(images, n, s).float() - images.float()).abs().mean().item() for n in C.NAMES])
            for s in (1, 3, 5)}
    assert dist[1] < dist[3] < dist[5]


@needs_real_cifar
def test_accuracy_falls_with_severity_on_real_images(one_thread):
    """A cheap real classifier (ridge regression on 8x8-pooled pixels of 20,000 CIFAR-10 training images, 37% on
    the test images) loses accuracy from severity 1 to 5, averaged over the 15 corruptions. The toy images of the
    other tests are no use here: their classes are colours and stripes that survive every corruption."""
    from smallvit import data as D

    xt, yt = D.load("cifar10", str(REAL_DATA), download=False, train=True)
    x, y = D.load("cifar10", str(REAL_DATA), download=False, train=False)
    xt, yt, x, y = xt[:20000], yt[:20000], x[:200], y[:200]

    def feats(imgs):
        f = torch.nn.functional.avg_pool2d(imgs.double() / 255, 4).flatten(1)
        return torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], 1)

    f = feats(xt)
    w = torch.linalg.solve(f.T @ f + 0.1 * torch.eye(f.shape[1], dtype=torch.float64),
                           f.T @ torch.nn.functional.one_hot(yt, 10).double())

    def acc(imgs):
        return 100 * ((feats(imgs) @ w).argmax(1) == y).double().mean().item()

    by_sev = {s: np.mean([acc(C.corrupt(x, n, s)) for n in C.NAMES]) for s in (1, 5)}
    assert acc(x) > 30 and acc(x) >= by_sev[1] > by_sev[5] + 1, (acc(x), by_sev)


@pytest.mark.parametrize("severity", [1, 5])
def test_pixelate_and_jpeg_are_pillows(images, severity):
    from PIL import Image

    hwc = images.permute(0, 2, 3, 1).numpy()
    side = int(32 * C.PARAMS["pixelate"][severity - 1])
    want = [np.asarray(Image.fromarray(im).resize((side, side), Image.BOX).resize((32, 32), Image.BOX)) for im in hwc]
    got = C.corrupt(images, "pixelate", severity).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, np.stack(want))  # Pillow's fixed-point BOX filter, exactly
    buf = io.BytesIO()
    Image.fromarray(hwc[0]).save(buf, "JPEG", quality=C.PARAMS["jpeg_compression"][severity - 1])
    jpeg = C.corrupt(images[:1], "jpeg_compression", severity)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(jpeg, np.asarray(Image.open(buf)))


def test_bad_corruption_requests():
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        C.check(["fogg"], [1])
    with pytest.raises(ValueError, match="severity must be 1 to 5, got 6"):
        C.check(["fog"], [6])


# ---- the cache


def test_cache_reuses_and_invalidates(tmp_path, images, monkeypatch, capsys):
    def cache(seed=0):
        return R.GeneratedCache(tmp_path, images, seed, torch.device("cpu"))

    c = cache()
    first = c.images("fog", 2, 8)
    assert c.generated == 1 and (tmp_path / "fog-2.npy").is_file()
    c = cache()
    assert torch.equal(c.images("fog", 2, 8), first) and c.generated == 0  # read back
    assert torch.equal(c.images("fog", 2, 5), first[:5]) and c.generated == 0  # a prefix of the cached file
    assert torch.equal(c.images("fog", 2, 12)[:8], first) and c.generated == 1  # more images: generated again
    c = cache(seed=1)  # another seed: everything generated again
    assert not torch.equal(c.images("fog", 2, 8), first) and c.generated == 1
    assert "generating again" in capsys.readouterr().err
    c = cache()
    c.images("fog", 2, 8)
    monkeypatch.setattr(C, "GENERATOR_VERSION", C.GENERATOR_VERSION + 1)  # another generator: again
    c = cache()
    assert torch.equal(c.images("fog", 2, 8), first) and c.generated == 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["generator_version"] == C.GENERATOR_VERSION and manifest["seed"] == 0
    blob = bytearray((tmp_path / "fog-2.npy").read_bytes())
    blob[-1] ^= 0xFF  # a flipped bit in the file
    (tmp_path / "fog-2.npy").write_bytes(bytes(blob))
    c = cache()
    assert torch.equal(c.images("fog", 2, 8), first) and c.generated == 1
    assert "does not match its checksum" in capsys.readouterr().err


# ---- a tiny trained run with a validation split, evaluated through the CLI


@pytest.fixture(scope="module")
def val_run(cifar, tmp_path_factory):
    import smallvit

    out = tmp_path_factory.mktemp("runs") / "val"
    smallvit.train(smoke_config(cifar, **SHORT_RUN, **{"data.val_images": 32}), out)
    return out


@pytest.mark.slow
def test_eval_suite_end_to_end(val_run, cifar, tmp_path, capsys, restore_threads):
    out = tmp_path / "out"
    code = run_main_out(capsys, "eval", str(val_run), "--data-dir", str(cifar), "--out", str(out), "--tta-flip",
                        "--temperature", "--corruptions", "gaussian_noise,fog", "--severities", "1,5",
                        "--corruption-images", "16", "--cache", str(tmp_path / "cache"), "--device", "cpu")
    assert code[0] == 0, code[1]
    report = json_out(code[2])
    suite = R.read_suite(out)
    for key in ("ece", "nll", "brier", "ece_tta", "temperature", "ece_ts", "corruption_acc", "corruption_rel_drop"):
        assert suite[key] is not None and report[key] == suite[key], key
    assert suite["temperature_fit_images"] == 32 and suite["corruption_images"] == 16
    assert set(suite["corruption_acc_table"]) == {"gaussian_noise", "fog"}
    assert set(suite["corruption_acc_table"]["fog"]) == {"1", "5"}
    assert (out / "reliability.png").is_file() and (tmp_path / "cache" / "fog-5.npy").is_file()
    # calibration alone later: the corruption results of the same checkpoint are kept
    assert run_main_out(capsys, "eval", str(val_run), "--data-dir", str(cifar), "--out", str(out))[0] == 0
    assert R.read_suite(out)["corruption_acc"] == suite["corruption_acc"]


def run_main_out(capsys, *args):
    from smallvit.cli import main

    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.err, cap.out


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "fogg"], "unknown corruption 'fogg'; choose from: gaussian_noise"),
    (["--corruptions", "--severities", "0,3"], "corruption severity must be 1 to 5, got 0"),
    (["--corruptions", "fog", "--severities", "6"], "corruption severity must be 1 to 5, got 6"),
])
@pytest.mark.slow
def test_eval_bad_input_is_one_line(val_run, cifar, tmp_path, capsys, args, message):
    code, err, _ = run_main_out(capsys, "eval", str(val_run), "--data-dir", str(cifar), "--out", str(tmp_path / "o"),
                                *args)
    assert code == 2 and err.startswith(f"smallvit eval: error: {message}"), err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_temperature_needs_a_validation_split(timm_run, tmp_path, capsys):
    code, err, _ = run_main_out(capsys, "eval", str(timm_run), "--temperature", "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("smallvit eval: error: temperature scaling is fitted on the validation "
                                        "split"), err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("parts, message", [
    ("calibration,robustness", "unknown --eval-suite part 'robustness'; choose from: calibration, temperature"),
    ("temperature", "temperature scaling is fitted on the validation split, and the study's runs"),
])
def test_ablate_bad_eval_suite_is_one_line(cifar, tmp_path, capsys, parts, message):
    code, err, _ = run_main_out(capsys, "ablate", "patch", "--preset", "smoke", "--root", str(tmp_path / "studies"),
                                "--data-dir", str(cifar), "--eval-suite", parts)
    assert code == 2 and err.startswith(f"smallvit ablate: error: {message}"), err
    assert err.count("\n") == 1 and not (tmp_path / "studies").exists()


def _official_files(root, y, shift: int = 0):
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    n = len(y)
    np.save(folder / "labels.npy", np.tile(y.numpy(), 5).astype(np.uint8))
    x = np.random.default_rng(0).integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    np.save(folder / "fog.npy", x)
    (root / "CIFAR-10-C.tar").write_bytes(b"not the real archive" + bytes([shift]))
    return x


@pytest.mark.slow
def test_official_files_are_checked_and_used(val_run, tmp_path, monkeypatch, capsys):
    from smallvit import data as D

    root = tmp_path / "data"
    write_fake_cifar10(root, n_train=320, n_test=64)  # the same bytes as the `cifar` fixture's
    _, y = D.load("cifar10", str(root), download=False, train=False)
    official = _official_files(root, y)
    tar_md5 = __import__("hashlib").md5((root / "CIFAR-10-C.tar").read_bytes()).hexdigest()
    monkeypatch.setitem(R.OFFICIAL, "cifar10", ("CIFAR-10-C", "CIFAR-10-C.tar", tar_md5))
    args = ("eval", str(val_run), "--data-dir", str(root), "--out", str(tmp_path / "o"), "--corruptions", "fog",
            "--severities", "2", "--corruption-images", "10")
    code, err, out = run_main_out(capsys, *args)
    assert code == 0, err
    suite = R.read_suite(tmp_path / "o")
    assert suite["corruption_source"].startswith("official") and not (root / "cifar10-c-generated").exists()
    assert len(official) == 5 * 64
    monkeypatch.setitem(R.OFFICIAL, "cifar10", ("CIFAR-10-C", "CIFAR-10-C.tar", "0" * 32))  # the wrong md5
    code, err, _ = run_main_out(capsys, *args)
    assert code == 2 and err.startswith("smallvit eval: error: ") and "CIFAR-10-C.tar has md5" in err, err
    assert err.count("\n") == 1
    (root / "CIFAR-10-C.tar").unlink()  # without the tar, the labels are still checked against the test set
    np.save(root / "CIFAR-10-C" / "labels.npy", np.zeros(5 * 64, np.uint8))
    code, err, _ = run_main_out(capsys, *args)
    assert code == 2 and "labels.npy is not the test labels" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_report_has_ece_and_corruption_columns(val_run, tmp_path):
    from smallvit.report import report

    for seed, (ece, mca) in enumerate([(0.05, 40.0), (0.07, 44.0)]):
        run = tmp_path / "study" / "baseline" / f"seed{seed}"
        shutil.copytree(val_run, run)
        cfg = json.loads((run / "config.json").read_text())
        cfg["train"]["seed"] = seed
        (run / "config.json").write_text(json.dumps(cfg))
        (run / R.SUITE_FILE).write_text(json.dumps({"ece": ece, "corruption_acc": mca}))
    r = report(tmp_path / "study")
    assert "ECE % (mean ± std)" in r["table"] and "| 6.00 ± 1.41 | 42.00 ± 2.83 |" in r["table"], r["table"]
    assert r["rows"][0]["corruption_acc_mean"] == pytest.approx(42.0)


# the smoke model learns the toy classes in a few dozen steps without the heavy augmentation (test_train.py)
LEARNS = ("train.epochs=8", "optim.lr=3e-3", "aug.autoaugment=none", "aug.mixup=false", "aug.cutmix=false",
          "aug.erase_p=0")


@pytest.mark.slow
def test_accuracy_falls_with_severity_and_ablate_runs_the_suite(fake_cifar, tmp_path, capsys, restore_threads):
    """A study of smoke models, then the evaluation suite on each run, once."""
    code, err, out = run_main_out(
        capsys, "ablate", "patch", "--preset", "smoke", "--root", str(tmp_path / "studies"), "--data-dir",
        str(fake_cifar), "--eval-suite", "calibration,temperature,corruptions", "--corruption-images", "100",
        "--set", "data.download=false", "data.subset=0", "data.test_subset=0", "train.threads=1",
        "data.val_images=60", *LEARNS)
    assert code == 0, err
    assert "ECE % (mean ± std)" in out and "corruption acc %" in out
    suites = [R.read_suite(p.parent) for p in (tmp_path / "studies" / "patch").rglob("result.json")]
    assert len(suites) == 3 and all(s.get("temperature") and s.get("corruption_images") == 100 for s in suites)
    assert all(len(s["corruption_acc_table"]) == 15 and s["corruption_rel_drop"] is not None for s in suites)
    # a restarted study skips the suites already done
    code, err, out = run_main_out(
        capsys, "ablate", "patch", "--preset", "smoke", "--root", str(tmp_path / "studies"), "--data-dir",
        str(fake_cifar), "--eval-suite", "calibration,temperature,corruptions", "--corruption-images", "100",
        "--set", "data.download=false", "data.subset=0", "data.test_subset=0", "train.threads=1",
        "data.val_images=60", *LEARNS)
    assert code == 0 and "eval suite" not in out, out


def test_without_torchmetrics_everything_but_ece(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics raises ImportError
    s = cal.scores(torch.randn(20, 10), torch.arange(20) % 10)
    assert s["ece"] is None and s["nll"] > 0 and s["brier"] > 0


@pytest.mark.slow
def test_validation_suite_scores_the_validation_split_for_search_objectives(val_run, cifar, tmp_path, restore_threads,
                                                                              monkeypatch):
    """search's "ece" and "corruption_acc" objectives: on the run's validation images, never the test set's."""
    import shutil

    from smallvit.search import OBJECTIVES

    run = tmp_path / "trial-0000"
    shutil.copytree(val_run, run)
    seen, real = [], R._val_split

    def spy(cfg, root, download):
        x, y = real(cfg, root, download)
        seen.append(len(y))
        return x, y

    monkeypatch.setattr(R, "_val_split", spy)

    res = R.validation_suite(run, corruption_images=8, data_dir=str(cifar))
    assert seen == [32] and res["split"] == "val" and res["val_images"] == 32 and res["corruption_images"] == 8
    assert 0 <= res["ece"] <= 1 and 0 <= res["corruption_acc"] <= 100
    assert len(res["corruption_acc_table"]) == 15 and (tmp_path / "val-corruptions" / "manifest.json").is_file()
    for name, want in (("ece", res["ece"]), ("corruption_acc", res["corruption_acc"])):
        o = OBJECTIVES[name]
        assert R.read_json(run / o.file)[o.key] == want
