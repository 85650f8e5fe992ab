"""The evaluation suite of a trained run: calibration (ECE, NLL, Brier; with flip TTA; after temperature scaling
fitted on the run's validation split) and accuracy under the 15 common corruptions of CIFAR-10-C.

Results go to RUN/eval-suite.json (read_suite reads them back as one flat dict, for reports, studies and search
objectives) and the reliability diagram to RUN/reliability.png. Corrupted test sets come from the official
CIFAR-10-C files when they are in the data folder (checked), else are generated (corruptions.py) and cached as one
uint8 .npy per corruption and severity with a manifest (docs/robustness.md).
"""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import calibration as cal
from . import corruptions as C
from . import data as D
from .config import ConfigError
from .datasets import DataError, md5sum
from .distributed import resolve_device
from .evaluate import Saved, load_saved, predict_logits
from .runs import atomic_write_bytes, atomic_write_json, read_json

SUITE_FILE = "eval-suite.json"
SUITE_PARTS = ("calibration", "temperature", "corruptions")  # what `ablate --eval-suite` accepts
# Zenodo record 2535967 publishes the md5 of CIFAR-10-C.tar only; per-file md5s are not published.
OFFICIAL = {"cifar10": ("CIFAR-10-C", "CIFAR-10-C.tar", "56bf5dcef84df0e2308c6dcbcbbd8499")}


@dataclass(frozen=True)
class Suite:
    """What to compute. Calibration is always computed (cheap); the rest on request."""

    tta_flip: bool = False
    temperature: bool = False
    corruptions: tuple[str, ...] = ()  # () : none
    severities: tuple[int, ...] = C.SEVERITIES
    corruption_images: int = 0  # the first N test images; 0: all
    seed: int = 0
    cache: str | None = None  # folder of generated sets (default DATA/<dataset>-c-generated)
    batch_size: int = 500
    parts: tuple[str, ...] = field(default=())  # as asked by --eval-suite (recorded, for skipping done work)


def parse_names(text: str | None, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma-separated list of names from `choices` ("all": every one), or ConfigError naming the choices."""
    if not text:
        return ()
    names = choices if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in choices]
    if bad:
        raise ConfigError(f"unknown {what} {bad[0]!r}; choose from: {', '.join(choices)} (or all)")
    return names


def parse_severities(text: str) -> tuple[int, ...]:
    try:
        sev = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--severities takes integers 1-5 such as 1,3,5; got {text!r}") from None
    bad = [s for s in sev if s not in C.SEVERITIES]
    if bad or not sev:
        raise ConfigError(f"corruption severity must be 1 to 5, got {bad[0] if bad else text!r}")
    return sev


def suite_from_parts(parts: tuple[str, ...], **kw) -> Suite:
    """The Suite of `ablate --eval-suite calibration,temperature,corruptions` (every corruption, every severity)."""
    return Suite(temperature="temperature" in parts, corruptions=C.NAMES if "corruptions" in parts else (),
                 parts=parts, **kw)


def check(cfg, suite: Suite, source: str = "the run") -> None:
    """Refuse, before anything is read or written, what this run cannot give: temperature scaling without a
    validation split, corruptions of images that are not 32x32, a negative image count."""
    try:
        C.check(suite.corruptions, suite.severities)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if suite.temperature and not cfg.data.val_images:
        raise ConfigError(f"temperature scaling is fitted on the validation split, and {source} was trained without "
                          f"one (data.val_images=0); train with --set data.val_images=5000, or leave out temperature")
    if suite.corruptions and cfg.model.img_size != C.HSIZE:
        raise ConfigError(f"corruptions are defined for 32x32 images (CIFAR-10-C's parameters); {source} takes "
                          f"{cfg.model.img_size}x{cfg.model.img_size}")
    if suite.corruption_images < 0:
        raise ConfigError(f"--corruption-images must be >= 0 (0: every test image), got {suite.corruption_images}")


# ---- corrupted sets: official files or generated ones, cached


def _data_root(cfg, data_dir: str | None) -> Path:
    root = D.resolve_data_dir(data_dir if data_dir is not None else cfg.data.data_dir)
    info = D.dataset(cfg.data.dataset)
    return root.parent if info.folder and root.name == info.folder else root


def official_folder(dataset: str, root: Path, y_test: torch.Tensor, names: tuple[str, ...]) -> Path | None:
    """The official CIFAR-10-C folder under the data root when it holds every asked-for file, checked: the tar's
    published md5 when the tar lies beside it (per-file md5s are not published), each file's shape and dtype, and
    labels.npy against the test labels (so the files are this test set's, in its order). None when absent."""
    if dataset not in OFFICIAL:
        return None
    folder, tar, want = OFFICIAL[dataset]
    folder = root / folder
    if not all((folder / f"{n}.npy").is_file() for n in names) or not (folder / "labels.npy").is_file():
        return None
    n = 5 * len(y_test)
    if (root / tar).is_file():
        got = md5sum(root / tar)
        if got != want:
            raise DataError(f"{root / tar} has md5 {got}, but Zenodo record 2535967 publishes {want}: the archive is "
                            f"corrupt or not CIFAR-10-C; delete it and {folder} and download it again")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    if labels.shape != (n,) or not np.array_equal(np.asarray(labels, dtype=np.int64), np.tile(y_test.cpu().numpy(), 5)):
        raise DataError(f"{folder / 'labels.npy'} is not the test labels repeated for 5 severities (shape "
                        f"{labels.shape}, expected ({n},)): the folder is damaged or not CIFAR-10-C")
    for name in names:
        arr = np.load(folder / f"{name}.npy", mmap_mode="r")
        if arr.shape != (n, 32, 32, 3) or arr.dtype != np.uint8:
            raise DataError(f"{folder / name}.npy has shape {arr.shape} {arr.dtype}, expected ({n}, 32, 32, 3) "
                            f"uint8: the file is damaged or cut short")
    return folder


def _source_md5(x: torch.Tensor) -> str:
    return hashlib.md5(x.contiguous().cpu().numpy().tobytes()).hexdigest()


class GeneratedCache:
    """One uint8 (N, 32, 32, 3) .npy per corruption and severity (CIFAR-10-C's layout) and manifest.json with what
    made them: generator version, seed, md5 of the source test images, each file's image count and sha1. Another
    version, seed or source empties the cache; a file whose sha1 differs (damaged) is generated again."""

    def __init__(self, folder: Path, x_test: torch.Tensor, seed: int, device: torch.device):
        self.folder, self.x, self.seed, self.device = Path(folder), x_test, seed, device
        self.key = {"generator_version": C.GENERATOR_VERSION, "seed": seed, "source_md5": _source_md5(x_test),
                    "source_images": len(x_test)}
        path = self.folder / "manifest.json"
        self.manifest = {**self.key, "files": {}}
        if path.is_file():
            try:
                old = read_json(path)
            except Exception:  # noqa: BLE001 (a damaged manifest: start again)
                old = {}
            if all(old.get(k) == v for k, v in self.key.items()):
                self.manifest["files"] = old.get("files", {})
            elif old:
                self._note(f"{self.folder}: generated with {self._describe(old)}; generating again for "
                           f"{self._describe(self.key)}")
        self.generated = 0

    @staticmethod
    def _describe(m: dict) -> str:
        return (f"generator v{m.get('generator_version')}, seed {m.get('seed')}, source md5 "
                f"{str(m.get('source_md5'))[:8]}")

    @staticmethod
    def _note(text: str) -> None:
        print(f"note: {text}", file=sys.stderr, flush=True)

    def images(self, name: str, severity: int, n: int) -> torch.Tensor:
        """The first n images of `name` at `severity`, (n, 3, 32, 32) uint8: from the cache, else generated."""
        fname = f"{name}-{severity}.npy"
        entry = self.manifest["files"].get(fname)
        path = self.folder / fname
        if entry and entry["images"] >= n and path.is_file():
            blob = path.read_bytes()
            if hashlib.sha1(blob).hexdigest() == entry["sha1"]:
                arr = np.load(io.BytesIO(blob))
                return torch.from_numpy(np.ascontiguousarray(arr[:n])).permute(0, 3, 1, 2).contiguous()
            self._note(f"{path} does not match its checksum in the manifest (damaged); generating it again")
        out = C.corrupt(self.x[:n], name, severity, self.seed, self.device)
        buf = io.BytesIO()
        np.save(buf, out.permute(0, 2, 3, 1).contiguous().numpy())
        blob = buf.getvalue()
        atomic_write_bytes(path, lambda f: f.write(blob))
        self.manifest["files"][fname] = {"images": n, "sha1": hashlib.sha1(blob).hexdigest()}
        atomic_write_json(self.folder / "manifest.json", self.manifest)
        self.generated += 1
        return out


def corruption_accuracy(saved: Saved, x: torch.Tensor, y: torch.Tensor, suite: Suite, root: Path,
                        device: torch.device, official_ok: bool = True) -> dict:
    """Accuracy (and ECE) on each corruption x severity of the first N test images, their mean and the relative
    drop from the clean accuracy on the same images. official_ok=False: always generated (images other than the
    test set's)."""
    n = suite.corruption_images or len(x)
    n = min(n, len(x))
    info = saved.meta
    official = official_folder(saved.cfg.data.dataset, root, y, suite.corruptions) if official_ok else None
    cache_dir = Path(suite.cache) if suite.cache else root / f"{saved.cfg.data.dataset}-c-generated"
    cache = None if official else GeneratedCache(cache_dir, x, suite.seed, device)
    xs, ys = x[:n], y[:n]

    def score(images):
        logits = predict_logits(saved.model, images, info.mean, info.std, suite.batch_size)
        return cal.scores(logits, ys)

    clean = score(xs)
    acc, ece = {}, {}
    for name in suite.corruptions:
        acc[name], ece[name] = {}, {}
        for s in suite.severities:
            if official:
                arr = np.load(official / f"{name}.npy", mmap_mode="r")[(s - 1) * len(x) : (s - 1) * len(x) + n]
                images = torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2).contiguous()
            else:
                images = cache.images(name, s, n)
            r = score(images)
            acc[name][str(s)], ece[name][str(s)] = r["acc"], r["ece"]
    flat = [a for per in acc.values() for a in per.values()]
    mca = sum(flat) / len(flat)
    eces = [e for per in ece.values() for e in per.values() if e is not None]
    return {
        "corruption_source": f"official {official}" if official else f"generated v{C.GENERATOR_VERSION} {cache_dir}",
        "corruption_images": n,
        "corruption_seed": None if official else suite.seed,
        "corruption_severities": list(suite.severities),
        "corruption_names": list(suite.corruptions),
        "corruption_clean_acc": clean["acc"],
        "corruption_acc": mca,  # mean over every corruption and severity asked for
        "corruption_rel_drop": (clean["acc"] - mca) / clean["acc"] if clean["acc"] else None,
        "corruption_ece": sum(eces) / len(eces) if eces else None,
        "corruption_acc_by_severity": {str(s): sum(acc[m][str(s)] for m in acc) / len(acc) for s in suite.severities},
        "corruption_acc_table": acc,
        "corruption_ece_table": ece,
        "corruption_generated_files": cache.generated if cache else 0,
    }


# ---- the suite


def _val_split(cfg, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's validation images, as training held them out (lifecycle.load_data: data.subset, then val_split)."""
    d = cfg.data
    x, y = D.load(d.dataset, str(root), download, train=True, img_size=cfg.model.img_size)
    if d.subset:
        x, y = x[: d.subset], y[: d.subset]
    _, held = D.val_split(y, d.val_images, d.val_seed)
    return x[held], y[held]


def evaluate_suite(run: str | Path, suite: Suite, data_dir: str | None = None, out_dir: str | Path | None = None,
                   device: str = "auto", saved: Saved | None = None) -> dict:
    """Compute the suite for a run folder or checkpoint; merge it into OUT/eval-suite.json (OUT: the run folder or
    out_dir) and draw OUT/reliability.png. Returns what this call computed."""
    dev = resolve_device(device)
    saved = saved or load_saved(run, dev)
    cfg, info = saved.cfg, saved.meta
    check(cfg, suite, str(run))
    name = cfg.data.dataset
    root = _data_root(cfg, data_dir)
    x, y = D.load(name, str(root), cfg.data.download, train=False, img_size=cfg.model.img_size)
    plain = predict_logits(saved.model, x, info.mean, info.std, suite.batch_size)
    res: dict = {"checkpoint": str(run), "step": saved.step, "dataset": name, "n_test": len(y),
                 "calibration_bins": cal.N_BINS}
    if not cal.have_torchmetrics():
        res["calibration_note"] = "torchmetrics is not installed: no ECE"
    s = cal.scores(plain, y)
    res.update(test_acc=s["acc"], ece=s["ece"], nll=s["nll"], brier=s["brier"])
    panels = {"test": (plain, y)}
    tta = None
    if suite.tta_flip:
        tta = predict_logits(saved.model, x, info.mean, info.std, suite.batch_size, tta_flip=True)
        s = cal.scores(tta, y)
        res.update(test_acc_tta=s["acc"], ece_tta=s["ece"], nll_tta=s["nll"], brier_tta=s["brier"])
        panels["test, flip TTA"] = (tta, y)
    if suite.temperature:
        xv, yv = _val_split(cfg, root, cfg.data.download)
        t = cal.fit_temperature(predict_logits(saved.model, xv, info.mean, info.std, suite.batch_size), yv)
        s = cal.scores(plain / t, y)
        res.update(temperature=t, temperature_fit_images=len(yv), test_acc_ts=s["acc"], ece_ts=s["ece"],
                   nll_ts=s["nll"], brier_ts=s["brier"])
        panels[f"test, T={t:.2f} (fit on val)"] = (plain / t, y)
        if tta is not None:
            vt = predict_logits(saved.model, xv, info.mean, info.std, suite.batch_size, tta_flip=True)
            t2 = cal.fit_temperature(vt, yv)
            s = cal.scores(tta / t2, y)
            res.update(temperature_tta=t2, ece_tta_ts=s["ece"], nll_tta_ts=s["nll"], brier_tta_ts=s["brier"])
    if suite.corruptions:
        res.update(corruption_accuracy(saved, x, y, suite, root, dev))
    if suite.parts:
        res["suite_parts"] = list(suite.parts)
    run_path = Path(run)
    out = Path(out_dir) if out_dir else (run_path if run_path.is_dir() else run_path.parent)
    out.mkdir(parents=True, exist_ok=True)
    cal.plot_reliability(panels, out / "reliability.png")
    res["reliability_png"] = str(out / "reliability.png")
    old = read_json(out / SUITE_FILE) if (out / SUITE_FILE).is_file() else {}
    merged = {**old, **res} if old.get("step") == res["step"] else res  # another checkpoint: start afresh
    atomic_write_json(out / SUITE_FILE, merged)
    return res


VAL_SUITE_FILE = "val-suite.json"


def validation_suite(run_dir: str | Path, corruption_images: int = 500, cache: str | Path | None = None,
                     data_dir: str | None = None) -> dict:
    """Calibration and corruption accuracy on the run's validation split, never the test set: what a search may
    select on (search.OBJECTIVES "ece" and "corruption_acc"). Every corruption and severity of the first
    `corruption_images` validation images, generated and cached in `cache` (default: beside the run folder, shared by
    the trials of a search, whose validation images are the same). Writes RUN/val-suite.json and returns it: acc,
    ece, nll, brier, corruption_acc, corruption_rel_drop, ..."""
    run_dir = Path(run_dir)
    dev = resolve_device("auto")
    saved = load_saved(run_dir, dev)
    cfg = saved.cfg
    if not cfg.data.val_images:
        raise ConfigError(f"{run_dir} was trained without a validation split (data.val_images=0): its calibration "
                          f"and robustness can only be scored on the test set (smallvit eval), not selected on")
    root = _data_root(cfg, data_dir)
    x, y = _val_split(cfg, root, cfg.data.download)
    res = cal.scores(predict_logits(saved.model, x, saved.meta.mean, saved.meta.std, 500), y)
    suite = Suite(corruptions=C.NAMES, corruption_images=corruption_images,
                  cache=str(cache) if cache else str(run_dir.parent / "val-corruptions"))
    res.update(corruption_accuracy(saved, x, y, suite, root, dev, official_ok=False), split="val",
               val_images=len(y), step=saved.step)
    atomic_write_json(run_dir / VAL_SUITE_FILE, res)
    return res


def read_suite(run_dir: str | Path) -> dict:
    """RUN/eval-suite.json as a dict ({} when the run was not evaluated with the suite). Keys, each present when
    computed: test_acc, ece, nll, brier; *_tta (flip TTA); temperature, ece_ts, nll_ts, brier_ts; corruption_acc
    (mean over corruptions and severities, %), corruption_clean_acc, corruption_rel_drop ((clean - mean) / clean),
    corruption_ece, corruption_images, corruption_acc_table {name: {severity: acc}}. ECE and Brier are fractions,
    accuracies %."""
    path = Path(run_dir) / SUITE_FILE
    return read_json(path) if path.is_file() else {}


def suite_done(run_dir: Path, suite: Suite) -> bool:
    """Whether RUN/eval-suite.json already holds what `suite` asks for, for the run's current checkpoint step."""
    have = read_suite(run_dir)
    if not have or have.get("ece", 0) is None and cal.have_torchmetrics():
        return False
    if suite.temperature and "temperature" not in have:
        return False
    if suite.corruptions:
        n = have.get("corruption_images")
        want = suite.corruption_images or have.get("n_test")
        if (n != want or set(have.get("corruption_names", [])) != set(suite.corruptions)
                or have.get("corruption_severities") != list(suite.severities)):
            return False
    result = read_json(run_dir / "result.json") if (run_dir / "result.json").is_file() else {}
    return result.get("step") is None or have.get("step") == result.get("step")
