"""Design-space search with Optuna: trials are ordinary runs of a study folder, scored on the validation split.

Layout: <root>/<name>/search.json (the settings), journal.log (Optuna's JournalStorage, unless --storage names an
RDB), trial-0007/ (a run folder per trained trial), final/<label>/seed<k>/ (the top-k and the baseline retrained on
the full training set, scored once on the test set) and the report (search.md, trials.csv, pareto-*.png).

A space (experiments.SPACES or a JSON/TOML file) maps config keys to choices or ranges. Each trial: sample (TPE for
one objective, NSGA-II for several), build the config (a combination the config refuses is pruned with its reason),
check --max-params/--max-flops on the built model (pruned with its reason, never trained), train with a step hook
that reports each validation accuracy to the pruner and keeps a heartbeat, read the objectives from the run folder.
A trial whose worker died (same host and its process gone, or no heartbeat for HEARTBEAT_GRACE_S) is failed with a
reason by the next worker and retried in the same run folder, which resumes from its checkpoint. docs/search.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import VALID_KEYS, ConfigError, apply_overrides, coerce, refuse_unread
from .experiments import SPACES, make_config
from .runs import RESUME_FREE_KEYS, atomic_write_json, read_json

SETTINGS = "search.json"
JOURNAL = "journal.log"
FINAL = "final"
HEARTBEAT_S = 30.0  # a running trial writes its heartbeat this often (at most)
HEARTBEAT_GRACE_S = 600.0  # a trial of another host without a heartbeat for this long is failed and retried
# The retrains of --retrain-top / --finalize: the full training set (no validation split), the test set scored once
RETRAIN = {"data.val_images": 0, "train.eval_every_epochs": 0}


@dataclass(frozen=True)
class Objective:
    """What a trial is scored on: a number in a JSON file of its run folder, and its direction. `make(run folder)`,
    if given, writes that file first (e.g. an evaluation); it must score the validation split, never the test set."""

    direction: str  # maximize | minimize
    file: str
    key: str
    what: str
    make: object = None


def _validation_suite(run):
    from .robustness import validation_suite

    return validation_suite(run)


# One entry per objective (a metric written by `smallvit eval` into the run folder is one entry with its `make`).
OBJECTIVES: dict[str, Objective] = {
    "val_acc": Objective("maximize", "result.json", "final_val_acc", "validation accuracy at the end (%)"),
    "params": Objective("minimize", "result.json", "params", "parameters"),
    "flops": Objective("minimize", "result.json", "flops_per_image", "forward FLOPs per image"),
    "seconds": Objective("minimize", "result.json", "wall_seconds", "wall seconds of the run"),
    # robustness.validation_suite: on the validation split (the first 500 of its images for the corruptions)
    "ece": Objective("minimize", "val-suite.json", "ece", "expected calibration error on the validation split",
                     make=_validation_suite),
    "corruption_acc": Objective("maximize", "val-suite.json", "corruption_acc", "mean accuracy (%) under the 15 "
                                "corruptions x 5 severities of 500 validation images",
                                make=_validation_suite),
}

PRUNERS = ("none", "median", "hyperband")


class Pruned(Exception):
    """A trial stopped before or during training; the message is its reason (raised as Optuna's TrialPruned)."""


# ---- spaces


def parse_space(raw: dict, source: str) -> dict[str, object]:
    """A space as {key: [choices] | {"low", "high", "log", "step"}} with every value checked; ConfigError names the
    key. Nested tables ({"model": {"depth": ...}}, TOML's sections) are read as dotted keys."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"space {source}: expected a table of config keys, got {raw!r}")
    flat = {}
    for key, dim in raw.items():
        if isinstance(dim, dict) and key in {k.split(".")[0] for k in VALID_KEYS} and "low" not in dim:
            flat.update({f"{key}.{k}": v for k, v in dim.items()})
        else:
            flat[key] = dim
    space = {}
    for key, dim in flat.items():
        if key not in VALID_KEYS:
            raise ConfigError(f"space {source}: unknown config key {key!r} (see `smallvit train --set x=1`)")
        t = VALID_KEYS[key]
        if isinstance(dim, list):
            if not dim:
                raise ConfigError(f"space {source}: {key} has no choices")
            values = [coerce(key, v, t) for v in dim]
            if any(not isinstance(v, (bool, int, float, str)) for v in values):
                raise ConfigError(f"space {source}: {key} takes tuples, which a space cannot choose")
            if len(set(values)) != len(values):
                raise ConfigError(f"space {source}: {key} lists a choice twice: {dim}")
            space[key] = values
        elif isinstance(dim, dict):
            extra = set(dim) - {"low", "high", "log", "step"}
            if extra or not {"low", "high"} <= set(dim):
                raise ConfigError(f"space {source}: {key} must be a list of choices or {{low, high[, log, step]}}, "
                                  f"got {dim}")
            if t not in (int, float):
                raise ConfigError(f"space {source}: {key} is not a number; give a list of choices")
            lo, hi = coerce(key, dim["low"], t), coerce(key, dim["high"], t)
            log = dim.get("log", False)
            if not isinstance(log, bool):
                raise ConfigError(f"space {source}: {key}: log must be true or false, got {log!r}")
            if not lo < hi:
                raise ConfigError(f"space {source}: {key}: empty range, low={lo} must be < high={hi}")
            if log and lo <= 0:
                raise ConfigError(f"space {source}: {key}: a log range needs low > 0, got {lo}")
            step = dim.get("step")
            if step is not None and (log or coerce(key, step, t) <= 0):
                raise ConfigError(f"space {source}: {key}: step must be positive and without log, got {step}")
            space[key] = {"low": lo, "high": hi, "log": log, **({"step": coerce(key, step, t)} if step else {})}
        else:
            raise ConfigError(f"space {source}: {key} must be a list of choices or {{low, high[, log]}}, got {dim!r}")
    return space


def load_space(spec: str) -> dict[str, object]:
    """A built-in space (experiments.SPACES) by name, or a .json/.toml file of one."""
    if spec in SPACES:
        return parse_space(SPACES[spec], spec)
    path = Path(spec)
    if path.suffix not in (".json", ".toml"):
        raise ConfigError(f"unknown space {spec!r}; choose from: {', '.join(SPACES)}, or a .json/.toml file")
    if not path.is_file():
        raise ConfigError(f"space file {spec} not found")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"space file {spec} is malformed: {str(e).splitlines()[0]}") from None
    return parse_space(raw, spec)


def suggest(trial, space: dict) -> dict[str, object]:
    """The trial's values of every key of the space."""
    out = {}
    for key, dim in space.items():
        if isinstance(dim, list):
            out[key] = trial.suggest_categorical(key, dim)
        elif isinstance(dim["low"], int):
            out[key] = trial.suggest_int(key, dim["low"], dim["high"], step=dim.get("step", 1), log=dim["log"])
        else:
            out[key] = trial.suggest_float(key, dim["low"], dim["high"], step=dim.get("step"), log=dim["log"])
    return out


def preset_point(s: Settings) -> dict[str, object]:
    """The preset's own values (with --set) of the space's keys: the hand-made configuration as a point of the space,
    refused in one line where it is not one (a value outside a key's choices)."""
    base, point = s.base(), {}
    for key, dim in s.space.items():
        section, name = key.split(".")
        value = getattr(getattr(base, section), name)
        if isinstance(dim, list) and value not in dim:
            raise ConfigError(f"--enqueue-preset: the preset's {key}={value!r} is not among the space's choices "
                              f"{dim}; add it to the space or leave --enqueue-preset out")
        point[key] = value
    return point


def enqueue_preset(study, point: dict[str, object]) -> bool:
    """Queue the preset's point (`preset_point`) as a trial, once per study (Optuna's enqueue_trial: the sampler then
    knows the hand-made configuration's score at the search's cost, and the report ranks it among the trials)."""
    if any(t.user_attrs.get("preset") for t in study.get_trials(deepcopy=False)):
        return False
    study.enqueue_trial(point, user_attrs={"preset": True}, skip_if_exists=False)
    return True


def corners(space: dict, limit: int = 64, seed: int = 0) -> list[dict]:
    """Up to `limit` points of the space's corners (each range's ends, each choice): where the smallest model is."""
    axes = [[(k, v) for v in (dim if isinstance(dim, list) else [dim["low"], dim["high"]])] for k, dim in space.items()]
    total = math.prod(len(a) for a in axes)
    if total <= limit:
        import itertools

        return [dict(p) for p in itertools.product(*axes)]
    rng = random.Random(seed)
    return [dict(a[0] for a in axes)] + [dict(rng.choice(a) for a in axes) for _ in range(limit - 1)]


# ---- settings


@dataclass(frozen=True)
class Settings:
    """What a search is; a study folder holds one (search.json), and a rerun with other settings is refused."""

    name: str
    preset: str
    overrides: dict
    space: dict
    objectives: list  # [[name, direction], ...]
    max_params: int = 0
    max_flops: int = 0
    pruner: str = "hyperband"
    storage: str = ""  # "" : the journal file in the study folder
    seed: int = 0

    def base(self):
        return make_config(self.preset, self.overrides)


def parse_objective(text: str) -> list:
    name, _, way = text.partition(":")
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose from: {', '.join(OBJECTIVES)} (as NAME or NAME:max/min)")
    if way not in ("", "max", "min"):
        raise ConfigError(f"--objective {text}: the direction must be max or min")
    return [name, {"max": "maximize", "min": "minimize"}.get(way, OBJECTIVES[name].direction)]


def measure(cfg) -> tuple[int, int]:
    """(parameters, forward FLOPs per image) of the model `cfg` builds."""
    from .backbones import build_model
    from .model import count_params, flops_per_image

    model = build_model(cfg.model)
    return count_params(model), flops_per_image(model)


def check(s: Settings, unread: tuple[str, ...] = ()) -> None:
    """Every refusal before anything runs or is written: the config, the validation split, the space's keys against
    --set, constraints that no corner of the space meets, the storage, the pruner with several objectives."""
    base = s.base()
    refuse_unread(base, make_config(s.preset), unread, "search")
    if not base.data.val_images:
        raise ConfigError("search scores trials on a validation split, never the test set: set data.val_images, "
                          "e.g. --set data.val_images=5000")
    both = sorted(set(s.space) & set(s.overrides))
    if both:
        raise ConfigError(f"{', '.join(both)}: both set (--set) and searched (--space); drop one")
    if len(s.objectives) > 1 and s.pruner != "none":
        raise ConfigError(f"--pruner {s.pruner}: Optuna prunes single-objective studies only (trial.report takes one "
                          f"value); use --pruner none with several objectives")
    if len({n for n, _ in s.objectives}) != len(s.objectives):
        raise ConfigError("an objective is given twice")
    if s.max_params or s.max_flops:
        sizes = []
        for point in corners(s.space):
            try:
                sizes.append(measure(apply_overrides(base, point)))
            except ConfigError:
                continue
        if sizes and s.max_params and min(p for p, _ in sizes) > s.max_params:
            raise ConfigError(f"--max-params {s.max_params:,}: the smallest model at the space's corners has "
                              f"{min(p for p, _ in sizes):,} parameters; no configuration can meet it")
        if sizes and s.max_flops and min(f for _, f in sizes) > s.max_flops:
            raise ConfigError(f"--max-flops {s.max_flops:,}: the cheapest model at the space's corners needs "
                              f"{min(f for _, f in sizes):,} FLOPs per image; no configuration can meet it")
    if s.storage:
        open_storage(s.storage, None)


def same_settings(folder: Path, s: Settings) -> None:
    """Refuse a folder whose search.json holds other settings (outside keys that cannot change a result)."""
    path = folder / SETTINGS
    if not path.is_file():
        return
    saved = read_json(path)
    mine = json.loads(json.dumps(asdict(s)))
    free = lambda o: {k: v for k, v in o.items() if k not in RESUME_FREE_KEYS}  # noqa: E731
    saved["overrides"], mine["overrides"] = free(saved.get("overrides", {})), free(mine["overrides"])
    changed = [k for k in mine if k != "seed" and saved.get(k) != mine[k]]
    if changed:
        raise ConfigError(f"{folder} holds a search with other {', '.join(changed)} ({path}); use another name or "
                          f"--root for these settings")


def read_settings(folder: Path) -> Settings:
    path = folder / SETTINGS
    if not path.is_file():
        raise ConfigError(f"no search in {folder} (no {SETTINGS}); start it with `smallvit search {folder.name} ...`")
    return Settings(**read_json(path))


# ---- storage and study


def open_storage(url: str, folder: Path | None):
    """Optuna's storage: the journal file in the study folder, or an RDB URL (connected now: one line if not)."""
    import optuna

    if not url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # sqlalchemy's errors, a missing driver, a malformed URL
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--storage {url}: cannot connect ({first[:300]})") from None


def load_study(folder: Path, s: Settings, seed: int = 0):
    """The Optuna study (created on first use): TPE for one objective, NSGA-II for several, the pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if len(s.objectives) == 1:
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # liar: parallel workers spread out
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=seed)
    pruner = {"none": optuna.pruners.NopPruner,
              "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)}[s.pruner]()
    return optuna.create_study(storage=open_storage(s.storage, folder), study_name=s.name, sampler=sampler,
                               pruner=pruner, directions=[d for _, d in s.objectives], load_if_exists=True)


# ---- trials


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # another machine's: only its heartbeat tells
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def retry_attrs(t, run: str | None) -> dict:
    """What a retry of trial `t` carries: which trial it retries, its run folder (resumed), and the preset mark."""
    return {"retry_of": t.number, "run": run, **({"preset": True} if t.user_attrs.get("preset") else {})}


def fail_stale(study) -> int:
    """Fail every RUNNING trial whose worker is gone (its process on this host, or HEARTBEAT_GRACE_S without a
    heartbeat), with the reason, and enqueue a retry of its parameters in its run folder; return how many."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w, beat = t.user_attrs.get("worker"), t.user_attrs.get("heartbeat")
        if w is None or beat is None or (w["pid"] == os.getpid() and w["host"] == socket.gethostname()):
            continue
        gone = not _alive(w["host"], w["pid"])
        silent = time.time() - beat > HEARTBEAT_GRACE_S
        if not (gone or silent):
            continue
        why = (f"worker {w['host']}:{w['pid']} died" if gone else
               f"no heartbeat from worker {w['host']}:{w['pid']} for {time.time() - beat:.0f} s")
        try:
            study._storage.set_trial_user_attr(t._trial_id, "error", f"{why}; retried in {t.user_attrs.get('run')}")
            if not study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker failed it first and retries it
            continue
        study.enqueue_trial(t.params, user_attrs=retry_attrs(t, t.user_attrs.get("run")), skip_if_exists=False)
        n += 1
    return n


def counted(study) -> tuple[int, int]:
    """(finished trials that count towards --trials, trials running or waiting): a failed trial that was retried
    counts through its retry."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    done = sum(t.state.is_finished() and t.number not in retried for t in trials)
    return done, sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)


class Reporter:
    """The step hook of a trial's training: each new validation accuracy in metrics.jsonl goes to the pruner (one
    report per evaluation, numbered from 1), and the trial's heartbeat is kept."""

    def __init__(self, trial, folder: Path, prune: bool):
        self.trial, self.path, self.prune = trial, folder / "metrics.jsonl", prune
        self.read, self.evals, self.beat = 0, 0, time.time()

    def __call__(self, step: int) -> None:
        now = time.time()
        if now - self.beat > HEARTBEAT_S:
            self.trial.set_user_attr("heartbeat", now)
            self.beat = now
        if not self.prune:
            return
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == self.read:
            return
        if size < self.read:  # a resumed run truncated its metrics: read them again
            self.read, self.evals = 0, 0
        with open(self.path, "rb") as f:
            f.seek(self.read)
            text = f.read(size - self.read)
        text = text[: text.rfind(b"\n") + 1]
        self.read += len(text)
        for line in text.decode().splitlines():
            rec = json.loads(line)
            if "val_acc" not in rec:
                continue
            self.evals += 1
            self.trial.report(rec["val_acc"], self.evals)
            self.trial.set_user_attr("val_acc", rec["val_acc"])
            if self.trial.should_prune():
                raise Pruned(f"pruner: validation accuracy {rec['val_acc']:.2f}% at evaluation {self.evals} "
                             f"(step {rec['step']})")


def run_trial(trial, folder: Path, s: Settings, extra: dict) -> list[float]:
    """One trial: sample, check, train, score (what Optuna's optimize calls)."""
    import optuna

    from .train import train

    trial.set_user_attr("heartbeat", time.time())  # before "worker": fail_stale reads a trial with both
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    params = suggest(trial, s.space)
    try:
        try:
            cfg = apply_overrides(s.base(), {**params, **extra})
        except ConfigError as e:
            raise Pruned(f"invalid: {e}") from None
        n_params, flops = measure(cfg)
        trial.set_user_attr("params", n_params)
        trial.set_user_attr("flops", flops)
        if s.max_params and n_params > s.max_params:
            raise Pruned(f"infeasible: {n_params:,} parameters > --max-params {s.max_params:,}")
        if s.max_flops and flops > s.max_flops:
            raise Pruned(f"infeasible: {flops:,} FLOPs per image > --max-flops {s.max_flops:,}")
        run = Path(trial.user_attrs.get("run") or folder / f"trial-{trial.number:04d}")
        trial.set_user_attr("run", str(run))
        start = time.time()
        try:
            result = train(cfg, run, resume=True, step_hook=Reporter(trial, run, s.pruner != "none"))
        finally:
            trial.set_user_attr("seconds", time.time() - start)
    except Pruned as e:
        trial.set_user_attr("prune_reason", str(e))
        raise optuna.TrialPruned(str(e)) from None
    except Exception as e:
        trial.set_user_attr("error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        raise
    if result["status"] == "interrupted":  # a signal: stop this worker; the trial resumes in its folder next time
        trial.set_user_attr("error", f"interrupted by {result.get('stop_signal')} at step {result['step']}; "
                                     f"retried in {run}")
        trial.study.enqueue_trial(params, user_attrs=retry_attrs(trial, str(run)))
        trial.study.stop()
        raise KeyboardInterrupt
    trial.set_user_attr("val_acc", result.get("final_val_acc"))
    values = []
    for name, _ in s.objectives:
        o = OBJECTIVES[name]
        if o.make is not None and not (run / o.file).is_file():
            o.make(run)
        values.append(float(read_json(run / o.file)[o.key]))
    return values


def work(folder: str | Path, n_trials: int, device: str = "", worker: int = 0) -> None:
    """A worker: run `n_trials` trials of the search in `folder` in this process (a launcher starts several)."""
    folder = Path(folder)
    s = read_settings(folder)
    study = load_study(folder, s, seed=s.seed * 1000 + worker * 100 + len(study_trials(folder, s)))
    extra = {"train.device": device} if device else {}
    if os.environ.get("SLURM_CPUS_PER_TASK") and not s.base().train.threads:
        extra["train.threads"] = int(os.environ["SLURM_CPUS_PER_TASK"])
    started = []  # the number of each trial this worker ran, for its line once it has finished

    def objective(trial):
        started.append(trial.number)
        return run_trial(trial, folder, s, extra)

    for _ in range(n_trials):
        fail_stale(study)
        before = len(started)
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        if len(started) > before:
            print(trial_line(study.get_trials(deepcopy=False)[started[-1]]), flush=True)


def trial_line(t) -> str:
    """One line per finished trial for the worker's output: its state, score, size and cost, or why it stopped."""
    a = t.user_attrs
    why = a.get("prune_reason") or a.get("error") or ""
    acc = f"val {a['val_acc']:.2f}%" if a.get("val_acc") is not None else ""
    size = f"{a['params'] / 1e6:.2f}M params, {a['flops'] / 1e6:.0f} MFLOPs" if "params" in a else ""
    secs = f"{a['seconds']:.0f} s" if "seconds" in a else ""
    what = " (the preset)" if a.get("preset") else ""
    return f"trial {t.number}{what}: {t.state.name.lower()}: " + ", ".join(x for x in (acc, size, secs, why) if x)


def study_trials(folder: Path, s: Settings) -> list:
    import optuna

    try:
        return optuna.load_study(study_name=s.name, storage=open_storage(s.storage, folder)).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


# ---- launchers


def worker_command(folder: Path, n: int, device: str, i: int) -> list[str]:
    code = "import sys; from smallvit.search import work; work(sys.argv[1], int(sys.argv[2]), sys.argv[3], " \
           "int(sys.argv[4]))"
    return [sys.executable, "-c", code, str(folder), str(n), device, str(i)]


def shares(n: int, workers: int) -> list[int]:
    return [n // workers + (i < n % workers) for i in range(workers) if n // workers + (i < n % workers)]


def run_workers(folder: Path, n: int, workers: int, devices: list[str] | None) -> None:
    """Side by side on this machine: one process per worker (per device), each running its share of the trials;
    their output goes to <folder>/worker<i>.log."""
    devices = devices or [""]
    parts = shares(n, max(workers, len(devices)))

    def launch(i: int) -> int:
        with open(folder / f"worker{i}.log", "a") as log:
            return subprocess.run(worker_command(folder, parts[i], devices[i % len(devices)], i), stdout=log,
                                  stderr=subprocess.STDOUT).returncode

    with ThreadPoolExecutor(len(parts)) as pool:
        codes = list(pool.map(launch, range(len(parts))))
    if any(codes):
        print(f"{sum(c != 0 for c in codes)} worker(s) failed; see worker<i>.log in {folder}", flush=True)


class SlurmWorker:
    """A search worker as one SLURM job of the array (submitit pickles this call)."""

    def __call__(self, folder: str, n: int, worker: int) -> None:
        work(folder, n, "", worker)


def submit_workers(folder: Path, n: int, workers: int, res, wait: bool) -> list[str]:
    """`--launcher slurm`: the workers as one job array (at most --max-parallel at once)."""
    from . import slurm

    parts = shares(n, workers)
    sub = (folder / slurm.SLURM_DIR).resolve()
    ex = slurm.executor(sub, res)
    slurm.check_request(res, sub, ex)
    sub.mkdir(parents=True, exist_ok=True)
    with slurm._submission_env():
        jobs = ex.map_array(SlurmWorker(), [str(folder.resolve())] * len(parts), parts, list(range(len(parts))))
    record = slurm.read_jobs(sub)
    for i, job in enumerate(jobs):
        record[f"worker{i}@{job.job_id}"] = {"job_id": job.job_id, "folder": str(folder.resolve()),
                                             "submitted": time.time(), "tasks": 1}
    atomic_write_json(sub / slurm.JOBS, record)
    print(f"submitted {len(jobs)} search workers as SLURM job {jobs[0].job_id.split('_')[0]} (at most "
          f"{res.max_parallel} at once); logs in {sub}", flush=True)
    if wait:
        slurm.wait(sub, [f"worker{i}@{job.job_id}" for i, job in enumerate(jobs)])
    return [j.job_id for j in jobs]


def search(s: Settings, root: str | Path, trials: int, launcher: str = "local", workers: int = 1,
           devices: list[str] | None = None, options=None, wait: bool = False, unread: tuple[str, ...] = (),
           with_preset: bool = False) -> Path:
    """Check everything, write search.json, then run the trials still missing towards `trials` through a launcher:
    local (this process, or `workers`/`devices` processes side by side) or slurm (a job array of workers).
    `with_preset`: the preset's own point of the space is the next trial (once per study)."""
    folder = Path(root) / s.name
    check(s, unread)
    point = preset_point(s) if with_preset else None  # refused before anything is written
    same_settings(folder, s)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SETTINGS, asdict(s))
    study = load_study(folder, s, s.seed)
    fail_stale(study)
    if point is not None and enqueue_preset(study, point):
        print("the preset's own values of the space's keys are queued as the next trial", flush=True)
    done, busy = counted(study)
    running = busy - sum(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False))
    todo = max(0, trials - done - running)  # a queued retry is one of the trials still to run
    print(f"search {s.name}: {done} of {trials} trials done, {busy} running or queued, {todo} to run; study folder "
          f"{folder}", flush=True)
    if not todo:
        return folder
    if launcher == "slurm":
        submit_workers(folder, todo, max(1, min(options.max_parallel, todo, workers if workers > 1 else todo)),
                       options, wait)
    elif workers > 1 or (devices and len(devices) > 1):
        run_workers(folder, todo, workers, devices)
    else:
        work(folder, todo, devices[0] if devices else "")
    return folder


# ---- the honest end: retrain the top-k and the baseline on the full training set, the test set seen once


def top_trials(study, k: int) -> list:
    """The k best complete trials: by the value (one objective), or the Pareto front by its first objective."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    pool = study.best_trials if len(study.directions) > 1 else done
    sign = -1 if study.directions[0].name == "MAXIMIZE" else 1
    return sorted(pool, key=lambda t: sign * t.values[0])[:k]


def finalize(folder: Path, top: int, seeds: int, final_overrides: dict | None = None, launcher: str = "local",
             devices: list[str] | None = None, options=None, wait: bool = False) -> dict:
    """Retrain the `top` best trials and the preset itself (the hand-made baseline) with `seeds` seeds on the whole
    training set (no validation split), the test set scored once at the end; final/<label>/seed<k>/."""
    from .launchers import LAUNCHERS, Study
    from .lifecycle import run_state

    s = read_settings(folder)
    study = load_study(folder, s, s.seed)
    # the preset's own trial (--enqueue-preset) is the baseline, which is retrained anyway
    best = [t for t in top_trials(study, top + 1) if not t.user_attrs.get("preset")][:top]
    if not best:
        raise ConfigError(f"no complete trial in {folder} to retrain; run the search first")
    fin = {**RETRAIN, **(final_overrides or {})}
    entries = {"baseline": {}} | {f"trial-{t.number:04d}": t.params for t in best}
    record = folder / FINAL / "final.json"
    before = read_json(record) if record.is_file() else None
    if before is not None:  # retrains already there were made with their overrides: never mix two protocols
        if before["overrides"] != json.loads(json.dumps(fin)):
            raise ConfigError(f"{folder / FINAL} holds retrains with other overrides ({before['overrides']}, now "
                              f"{fin}); use the same --final-set, or another NAME or --root")
        entries = before["entries"] | entries  # a larger --retrain-top adds to them
    todo = []
    for label, params in entries.items():
        cfg = make_config(s.preset, {**s.overrides, **params, **fin})
        for seed in range(seeds):
            run = folder / FINAL / label / f"seed{seed}"
            if run_state(run) != "done":
                todo.append((label, seed, apply_overrides(cfg, {"train.seed": seed}), run))
    (folder / FINAL).mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"entries": entries, "seeds": max(seeds, before["seeds"] if before else 0),
                               "overrides": fin})
    print(f"retraining the top {len(best)} and the baseline x {seeds} seeds on the full training set: "
          f"{len(todo)} runs to go", flush=True)
    name = launcher if launcher == "slurm" else "local"  # devices' processes rebuild configs from ablation names
    LAUNCHERS[name].study(Study(todo, folder / FINAL, s.preset, devices[:1] if devices else None, [], None,
                                options, wait))
    return entries
