"""The run lifecycle (lifecycle.py) both loops share, end to end: interrupted runs lose nothing, one writer per
run folder, failed writes keep the last checkpoint, torchrun equals one process, non-finite losses stop cleanly.

The two loops (train.py, pretrain.py) share one run lifecycle: the `_both` tests run both, so that what one of them
once did alone (compile mode, the rank-0 download, the wall clock) cannot drift again.

The interruption tests run the real `smallvit train` command in child processes and kill them with real signals.
A small driver (DRIVER below) makes the fake CIFAR-10 of conftest.py acceptable exactly as the `fake_cifar`
fixture does (it replaces the checksum table; the check itself is not weakened), imports the package once and
then forks one child per run, so each run starts in a fraction of a second instead of re-importing torch.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (
    REPO,
    SSL,
    assert_one_error,
    one_thread_config,
    run_main,
    smoke_config,
    train_args,
    write_fake_cifar10,
)
from smallvit import distributed, lifecycle
from smallvit import distributed as dist_
from smallvit import pretrain as P
from smallvit.augment import BatchAugment
from smallvit.cli import main
from smallvit.runs import CheckpointError, load_checkpoint, read_metrics

T = importlib.import_module("smallvit.train")  # the module (the package's `train` attribute is the function)


pytestmark = pytest.mark.usefixtures("restore_threads")  # in-process runs use one thread


# ---- both loops, one lifecycle


def _both(data, tmp_path, **over):
    """A 2-step train run and a 2-step pretrain run of the same settings; their results."""
    tr = T.train(smoke_config(data, **{"train.max_steps": 2, **over}), tmp_path / "train")
    pr = P.pretrain(smoke_config(data, **{"train.max_steps": 2, **SSL, **over}), tmp_path / "pretrain")
    return tr, pr


@pytest.mark.slow
def test_both_loops_compile_through_the_one_torchrun_safe_mode(cifar, tmp_path, monkeypatch, one_thread):
    """Under torchrun, reduce-overhead (CUDA graphs) crashes a compiled DDP module: both loops ask
    distributed.compile_mode, so both get the graph-free mode (here as if two processes asked)."""
    asked, compiled = [], []
    monkeypatch.setattr(dist_, "compile_mode", lambda mode, world: (asked.append(mode), ("default", "note"))[1])
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: (compiled.append(mode), fn)[1])
    _both(cifar, tmp_path, **{"train.compile": True, "train.compile_mode": "reduce-overhead"})
    assert asked == ["reduce-overhead", "reduce-overhead"] and compiled == [None, None]


@pytest.mark.slow
def test_both_loops_download_on_rank_0_before_every_rank_loads(cifar, tmp_path, monkeypatch, one_thread):
    """Both loops take the dataset's facts from lifecycle.dataset_info, which under torchrun lets rank 0 check and
    download the files before any rank reads them (Tiny-ImageNet pre-training without the files)."""
    calls = []
    real = lifecycle.dataset_info
    monkeypatch.setattr(T, "dataset_info", lambda cfg, world: (calls.append("train"), real(cfg, world))[1])
    monkeypatch.setattr(P, "dataset_info", lambda cfg, world: (calls.append("pretrain"), real(cfg, world))[1])
    _both(cifar, tmp_path)
    assert calls == ["train", "pretrain"]
    # what it does with two processes: rank 0 (here: on_rank0 runs it) loads with download=True first
    loads = []
    monkeypatch.setattr(lifecycle.dist_, "on_rank0", lambda fn, world: fn())
    monkeypatch.setattr(lifecycle.D, "load", lambda *a, **k: loads.append((a, k)) or True)
    monkeypatch.setattr(lifecycle.D, "dataset_meta", lambda *a, **k: "meta")
    cfg = smoke_config(cifar, **{"data.download": True})
    assert real(cfg, 2) == "meta" and loads == [(("cifar10", str(cifar), True), {"train": False})]
    loads.clear()
    real(cfg, 1)
    assert loads == []  # one process: D.load's own download, as before


@pytest.mark.slow
def test_both_loops_time_from_set_up_and_every_evaluation_has_wall_seconds(cifar, tmp_path, one_thread):
    tr, pr = _both(cifar, tmp_path, **{"train.max_steps": 0, "train.epochs": 2, "train.eval_every_epochs": 1})
    for r, kind, key in ((tr, "train", "test_acc"), (pr, "pretrain", "knn_acc")):
        evals = [m for m in read_metrics(tmp_path / kind) if key in m]
        assert len(evals) >= 2 and all("wall_seconds" in m and "train_seconds" in m for m in evals), kind
        walls = [m["wall_seconds"] for m in evals]
        assert walls == sorted(walls) and r["wall_seconds"] >= walls[-1], kind
        # the wall clock starts before set-up: it holds the first step (and loading) besides the timed steps
        assert r["first_step_seconds"] > 0 and r["wall_seconds"] >= r["first_step_seconds"] + r["train_seconds"]


# ---- real processes, real signals

DRIVER = r"""
import dataclasses, json, os, sys
from smallvit.datasets import DATASETS
DATASETS["cifar10"] = dataclasses.replace(DATASETS["cifar10"], md5=json.loads(open(sys.argv[1]).read()))
import smallvit.cli, smallvit.train  # the slow imports, once
if len(sys.argv) > 2:  # direct use (torchrun): one `smallvit` command with these arguments
    sys.exit(smallvit.cli.main(sys.argv[2:]))
for line in sys.stdin:  # server use: one JSON [args, log file] per line; answers the child's pid, then its exit code
    args, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            code = smallvit.cli.main(args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""

# Keys this version may not have yet: use them when the config knows them.
CKPT_EVERY = ["train.checkpoint_every_steps=5"]
EPOCHS, SPE = 8, 600 // 64  # the smoke preset on the 600 fake training images: 9 steps per epoch


class Server:
    """The driver in server mode: start a `smallvit` command as a forked child, signal it, collect its exit code."""

    def __init__(self, driver: Path, sums: Path, cwd: Path):
        self.p = subprocess.Popen([sys.executable, str(driver), str(sums)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, cwd=cwd)
        self.buf = b""

    def _line(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, "the driver did not answer in time"
            if select.select([self.p.stdout], [], [], left)[0]:
                chunk = os.read(self.p.stdout.fileno(), 4096)
                assert chunk, "the driver exited"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def start(self, args: list[str], log: Path) -> int:
        self.p.stdin.write((json.dumps([args, str(log)]) + "\n").encode())
        self.p.stdin.flush()
        return int(self._line())

    def wait(self) -> int:
        return int(self._line())

    def run(self, args: list[str], log: Path) -> int:
        self.start(args, log)
        return self.wait()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fake CIFAR-10 on disk, its checksums, the driver, and a running server."""
    root = tmp_path_factory.mktemp("reliability")
    sums = root / "sums.json"
    sums.write_text(json.dumps(write_fake_cifar10(root / "data")))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    server = Server(driver, sums, root)
    yield {"root": root, "data": root / "data", "sums": sums, "driver": driver, "server": server}
    server.close()


def _args(env, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "smoke", "--data-dir", str(env["data"]), "--out", str(out), "--set",
            "data.download=false", "data.subset=0", "data.test_subset=0", "train.threads=1", "train.device=cpu",
            f"train.epochs={EPOCHS}", "train.log_every_steps=1", *extra]


@pytest.fixture(scope="module")
def reference(env):
    """The uninterrupted run (full smoke augmentation and drop path, so every source of randomness is exercised)."""
    out = env["root"] / "reference"
    assert env["server"].run(_args(env, out), env["root"] / "reference.log") == 0
    return out


def _max_step(out: Path) -> int:
    return max((r["step"] for r in read_metrics(out) if "loss" in r), default=0)


def _wait_for_step(out: Path, target: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _max_step(out) < target:
        assert time.monotonic() < deadline, f"the run did not reach step {target}"
        time.sleep(0.002)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"


def _curve(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("test_acc")) for r in read_metrics(out)]


@pytest.mark.slow
@pytest.mark.parametrize("signals", [(signal.SIGKILL,) * 3, (signal.SIGTERM, signal.SIGINT, signal.SIGTERM)],
                         ids=["sigkill", "sigterm-sigint"])
def test_interrupted_and_resumed_run_equals_uninterrupted(env, reference, signals, tmp_path):
    rng = random.Random(sum(signals))
    out = tmp_path / "run"
    last = EPOCHS * SPE
    for k, sig in enumerate(signals):
        # A step the previous session never logged, so the kill falls in this session's training.
        target = min(_max_step(out) + rng.randint(2, 14), last - 4)
        log = tmp_path / f"session{k}.log"
        pid = env["server"].start(_args(env, out, *CKPT_EVERY, *(["--resume"] if k else [])), log)
        _wait_for_step(out, target)
        time.sleep(rng.uniform(0, 0.03))  # anywhere in a step, an evaluation or a checkpoint write
        os.kill(pid, sig)
        code = env["server"].wait()
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:  # the current step ends, a checkpoint is written at exactly that step, the exit is clean
            text = log.read_text()
            assert code == 130, text
            stopped = int(text.split("interrupted at step ")[1].split(";")[0])
            assert target <= stopped < last and load_checkpoint(out)["step"] == stopped
            assert "Traceback" not in text
    assert env["server"].run(_args(env, out, *CKPT_EVERY, "--resume"), tmp_path / "final.log") == 0
    _same_weights(out, reference)
    assert _curve(out) == _curve(reference)  # same losses, same lr, same evaluations, nothing duplicated
    assert json.loads((out / "result.json").read_text())["best_test_acc"] == \
        json.loads((reference / "result.json").read_text())["best_test_acc"]


def _direct(env, args: list[str], log: Path) -> subprocess.Popen:
    """One `smallvit` command in its own process (the driver's direct mode), concurrent with the server's child."""
    return subprocess.Popen([sys.executable, str(env["driver"]), str(env["sums"]), *args], cwd=env["root"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


@pytest.mark.slow
def test_one_writer_per_run_folder(env, reference, tmp_path):
    """While a run trains, a second fresh run and a --resume into its folder are refused in one line naming the
    holder, and write nothing there; after a kill -9 of the holder the kernel has released the lock and --resume
    continues to the uninterrupted run's weights and records, without duplicates."""
    out = tmp_path / "run"
    pid = env["server"].start(_args(env, out, *CKPT_EVERY), tmp_path / "a.log")
    _wait_for_step(out, 3)
    os.kill(pid, signal.SIGSTOP)  # alive and holding the folder for as long as the others take to start
    others = [_direct(env, _args(env, out, *extra), tmp_path / f"{name}.log")
              for name, extra in (("fresh", ()), ("resume", ("--resume",)))]
    codes = [p.wait(timeout=120) for p in others]
    for name in ("fresh", "resume"):
        text = (tmp_path / f"{name}.log").read_text()
        error = text.splitlines()[-1]
        assert error.startswith(f"smallvit train: error: {out} is in use by pid {pid} on "), text
        assert text.count("error:") == 1 and "Traceback" not in text, text
    assert codes == [2, 2]
    os.kill(pid, signal.SIGCONT)
    _wait_for_step(out, 12)
    os.kill(pid, signal.SIGKILL)
    assert env["server"].wait() == -signal.SIGKILL
    assert env["server"].run(_args(env, out, *CKPT_EVERY, "--resume"), tmp_path / "b.log") == 0
    _same_weights(out, reference)
    assert _curve(out) == _curve(reference)


@pytest.mark.slow
def test_wall_time_checkpoints_bound_what_a_kill_loses(env, reference, tmp_path):
    """No evaluation and no step interval before the end (the main job's shape): train.checkpoint_every_seconds
    alone writes checkpoints, so a kill -9 loses only the last interval, and --resume ends at the uninterrupted
    run's weights."""
    out = tmp_path / "run"
    timed = ["train.eval_every_epochs=0", "train.checkpoint_every_seconds=0.3"]
    pid = env["server"].start(_args(env, out, *timed), tmp_path / "a.log")
    _wait_for_step(out, 8)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").is_file():
        assert time.monotonic() < deadline, "no wall-time checkpoint was written"
        time.sleep(0.01)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    assert env["server"].wait() == -signal.SIGKILL
    saved = load_checkpoint(out)["step"]
    assert 0 < saved < EPOCHS * SPE
    assert env["server"].run(_args(env, out, *timed, "--resume"), tmp_path / "b.log") == 0
    _same_weights(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("limit_kib", [100, 2])
def test_a_write_that_really_fails_is_one_line_and_the_checkpoint_survives(env, tmp_path, limit_kib):
    """A real failed write, not a stand-in: the resumed process may write files of at most `limit_kib` KiB
    (RLIMIT_FSIZE, `ulimit -f`; Python ignores SIGXFSZ, so write() fails with EFBIG). 100 KiB: the checkpoint
    (about 300 KiB) cannot be replaced; 2 KiB: the records cannot be written either. Either way: exit 2, one line
    that says what to do, and the last checkpoint intact and resumable."""
    import resource

    out = tmp_path / "run"
    assert env["server"].run(_args(env, out, "train.max_steps=9"), tmp_path / "a.log") == 0
    before = (out / "checkpoint.pt").read_bytes()
    limit = limit_kib * 1024
    p = subprocess.Popen([sys.executable, str(env["driver"]), str(env["sums"]),
                          *_args(env, out, "train.max_steps=18", "--resume")], cwd=env["root"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("smallvit train: error: ") and "Traceback" not in err, err
    assert "File too large" in err and "--resume" in err, err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp"))  # the failed temporary file is gone
    assert env["server"].run(_args(env, out, "train.max_steps=18", "--resume"), tmp_path / "b.log") == 0
    assert load_checkpoint(out)["step"] == 18


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_old_one(env, tmp_path):
    """The writer is killed half-way through the temporary file: the previous checkpoint stays complete."""
    out = tmp_path / "run"
    assert env["server"].run(_args(env, out, "train.max_steps=9"), tmp_path / "a.log") == 0
    before = (out / "checkpoint.pt").read_bytes()
    script = (
        "import os, signal, sys\n"
        "from smallvit.runs import atomic_write_bytes\n"
        "def write(f):\n"
        "    f.write(b'x' * 100000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write_bytes(sys.argv[1], write)\n"
    )
    code = subprocess.run([sys.executable, "-c", script, str(out / "checkpoint.pt")], check=False).returncode
    assert code == -signal.SIGKILL
    assert (out / "checkpoint.pt").read_bytes() == before and load_checkpoint(out)["step"] == 9
    assert list(out.glob(".*.tmp"))  # the half-written temporary file is all that was lost ...
    assert env["server"].run(_args(env, out, "train.max_steps=12", "--resume"), tmp_path / "b.log") == 0
    assert not list(out.glob(".*.tmp")) and load_checkpoint(out)["step"] == 12  # ... and the resume cleans it up


def _torchrun(env, args: list[str], log: Path, stop_at_step: int = 0) -> tuple[int, str]:
    """Run the driver under torchrun with 2 CPU processes; optionally SIGTERM the launcher at a step."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(env["driver"]), str(env["sums"])]
    out = Path(args[args.index("--out") + 1])
    with open(log, "wb") as f:
        p = subprocess.Popen([*launch, *args], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if stop_at_step:
                _wait_for_step(out, stop_at_step)
                p.send_signal(signal.SIGTERM)  # what a cluster scheduler sends to the launcher
            code = p.wait(timeout=120)
        finally:
            if p.poll() is None:  # a failed test leaves no workers behind
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return code, log.read_text()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_and_stop_together(env, tmp_path):
    """gloo on CPU: 2 ranks x 32 images give the same training as 1 process x 64; SIGTERM stops both at one step."""
    plain = ["aug.crop_pad=0", "aug.flip=false", "aug.autoaugment=none", "aug.erase_p=0", "aug.mixup=false",
             "aug.cutmix=false", "model.drop_path=0", "train.epochs=10", "train.log_every_steps=2"]
    # 10 epochs (90 steps): long enough that the SIGTERM below lands before a fast, idle machine finishes.
    one = tmp_path / "one"
    assert env["server"].run(_args(env, one, *plain), tmp_path / "one.log") == 0
    two = tmp_path / "two"
    code, text = _torchrun(env, _args(env, two, *plain), tmp_path / "two.log", stop_at_step=8)
    stops = re.findall(r"interrupted at step (\d+);", text)  # found anywhere, should the ranks' lines interleave
    assert len(stops) == 2 and stops[0] == stops[1], text  # both ranks, the same step
    stopped = int(stops[0])
    # Ranks agree on stopping where they meet anyway: a log interval (2 steps) or an evaluation (every 9).
    assert (stopped % 2 == 0 or stopped % SPE == 0) and load_checkpoint(two)["step"] == stopped
    code, text = _torchrun(env, _args(env, two, *plain, "--resume"), tmp_path / "two-resumed.log")
    assert code == 0, text
    assert json.loads((two / "result.json").read_text())["world_size"] == 2
    wa, wb = load_checkpoint(one)["model"], load_checkpoint(two)["model"]
    for k in wa:
        if k.endswith("attn.k.bias"):
            # The key bias adds q.b to every logit of a query, which softmax ignores: its true gradient is zero and
            # it only ever gets rounding noise, which Adam's normalisation turns into lr-sized random steps. The
            # two runs round differently (all-reduce vs one batch), so this tensor is not comparable.
            continue
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)
    la = [r["loss"] for r in read_metrics(one) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(two) if "loss" in r]
    assert lb == pytest.approx(la, rel=1e-4)  # the logged loss is the global batch's, as in one process


def test_batch_must_divide_across_processes(fake_cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "setup", lambda device: (0, 2, torch.device("cpu"), False))
    with pytest.raises(T.ConfigError, match="divisible by the 2 processes"):
        T.train(one_thread_config(fake_cifar, **{"train.batch_size": 63}), tmp_path / "r")
    assert not (tmp_path / "r").exists()


# ---- two processes train what one does


def _relative_difference(a: Path, b: Path) -> float:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    va, vb = (torch.cat([w[k].double().flatten() for k in wa]) for w in (wa, wb))
    return ((va - vb).norm() / va.norm()).item()


@pytest.mark.slow
def test_two_processes_train_the_one_process_run_and_resume_it_exactly(env, tmp_path):
    """The full smoke recipe (augmentation, Mixup/CutMix, drop path): 2 processes end where 1 does, up to the order
    of float sums; a 1-process run stopped at step 5 and resumed on 2 processes too."""
    steps = ["train.max_steps=12", "train.checkpoint_every_steps=5"]
    one, two, moved = tmp_path / "one", tmp_path / "two", tmp_path / "moved"
    assert env["server"].run(_args(env, one, *steps), tmp_path / "one.log") == 0
    code, text = _torchrun(env, _args(env, two, *steps), tmp_path / "two.log")
    assert code == 0, text
    assert env["server"].run(_args(env, moved, "train.max_steps=5"), tmp_path / "moved.log") == 0
    assert load_checkpoint(moved)["world_size"] == 1 and load_checkpoint(moved)["device_type"] == "cpu"
    code, text = _torchrun(env, _args(env, moved, *steps, "--resume"), tmp_path / "moved2.log")
    assert code == 0, text
    assert load_checkpoint(moved)["world_size"] == 2 and load_checkpoint(moved)["step"] == 12
    assert _relative_difference(one, two) < 1e-5  # measured 1e-6; before every draw was global: 1e-2
    assert _relative_difference(one, moved) < 1e-5


@pytest.mark.slow
def test_resume_on_another_device_type_is_refused(fake_cifar, tmp_path):
    out = tmp_path / "run"
    T.train(one_thread_config(fake_cifar, **{"train.max_steps": 2}), out)
    state = load_checkpoint(out)
    assert (state["world_size"], state["device_type"]) == (1, "cpu")
    torch.save({**state, "device_type": "cuda"}, out / "checkpoint.pt")  # as a GPU run would have written it
    with pytest.raises(CheckpointError, match="trained on cuda and cannot continue exactly on cpu.*train.device=cuda"):
        T.train(one_thread_config(fake_cifar, **{"train.max_steps": 4}), out, resume=True)


# ---- resuming a finished run, and a run killed before its first checkpoint


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(fake_cifar, tmp_path):
    cfg = one_thread_config(fake_cifar, **{"train.max_steps": 4})
    first = T.train(cfg, tmp_path / "r")
    files = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    again = T.train(cfg, tmp_path / "r", resume=True)
    assert again["step"] == first["step"] == 4 and again["train_seconds"] == first["train_seconds"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == files


@pytest.mark.slow
def test_killed_before_the_first_checkpoint(fake_cifar, tmp_path, monkeypatch):
    """Records but no checkpoint: a plain rerun is refused, --resume starts over with a clean record."""
    out = tmp_path / "r"
    _train_killed_at(monkeypatch, 6, one_thread_config(fake_cifar, **{"train.log_every_steps": 1}), out)
    assert not (out / "checkpoint.pt").exists() and _max_step(out) == 6
    with pytest.raises(CheckpointError, match="already holds a run"):
        T.train(one_thread_config(fake_cifar, **{"train.log_every_steps": 1}), out)
    T.train(one_thread_config(fake_cifar, **{"train.log_every_steps": 1, "train.max_steps": 8}), out, resume=True)
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 9))


# ---- numerical faults


def _die(x):
    raise SystemExit("killed")


def _inject(monkeypatch, step: int, make):
    """Replace the training batch at one step (0-based) with make(batch)."""

    class Faulty(BatchAugment):
        def targets(self, x, y, s):
            xb, tb = super().targets(x, y, s)
            return (make(xb) if s == step else xb), tb

    monkeypatch.setattr(T, "BatchAugment", Faulty)


def _train_killed_at(monkeypatch, step: int, cfg, out):
    """Train `cfg` into `out` until the process dies at `step` (0-based), then restore the real augmentation."""
    _inject(monkeypatch, step=step, make=_die)
    with pytest.raises(SystemExit):
        T.train(cfg, out)
    monkeypatch.setattr(T, "BatchAugment", BatchAugment)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(fake_cifar, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    _inject(monkeypatch, step=10, make=lambda x: x * float("nan"))
    code, err = run_main(capsys, *train_args(fake_cifar, out))
    assert code == 2
    assert_one_error(err, "non-finite loss at step 11; training stopped and")
    assert f"{out / 'checkpoint.pt'} (step 9) is unchanged" in err and "train.on_nonfinite=skip" in err
    state = load_checkpoint(out)
    assert state["step"] == 9 and all(torch.isfinite(v).all() for v in state["model"].values())
    # The documented way on: resume with skip (allowed to differ on resume), and the run completes.
    assert main(train_args(fake_cifar, out, "train.on_nonfinite=skip", "--resume")) == 0
    assert {"step": 11, "event": "skipped_nonfinite"} in read_metrics(out)


@pytest.mark.slow
def test_nonfinite_skip_continues(fake_cifar, tmp_path, monkeypatch):
    _inject(monkeypatch, step=3, make=lambda x: x * float("inf"))
    cfg = one_thread_config(fake_cifar, **{"train.on_nonfinite": "skip", "train.max_steps": 12})
    r = T.train(cfg, tmp_path / "r")
    assert r["status"] == "stopped_at_max_steps" and r["step"] == 12
    assert [m["step"] for m in read_metrics(tmp_path / "r") if m.get("event") == "skipped_nonfinite"] == [4]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "r")["model"].values())


@pytest.mark.slow
def test_nonfinite_weights_never_replace_a_checkpoint(fake_cifar, tmp_path, monkeypatch):
    """Even if a fault slips past the loss check (as on GPUs between checks), the checkpoint is not overwritten."""
    out = tmp_path / "r"
    T.train(one_thread_config(fake_cifar, **{"train.max_steps": 9}), out)
    good = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(T, "check_each_step", lambda device, on_nonfinite: False)  # the GPU policy
    monkeypatch.setattr(T, "math", SimpleNamespace(isfinite=lambda v: True))  # and the one at log intervals
    _inject(monkeypatch, step=12, make=lambda x: x * float("nan"))
    with pytest.raises(T.TrainingError, match=r"non-finite weights at step 18; .*\(step 9\) is unchanged"):
        T.train(one_thread_config(fake_cifar), out, resume=True)
    assert (out / "checkpoint.pt").read_bytes() == good


@pytest.mark.slow
def test_nonfinite_loss_on_the_gpu_policy_stops_at_the_next_log(fake_cifar, tmp_path, monkeypatch):
    """GPUs check the loss only where the loop syncs anyway (log lines, checkpoints): the fault is still caught."""
    out = tmp_path / "r"
    monkeypatch.setattr(T, "check_each_step", lambda device, on_nonfinite: False)
    _inject(monkeypatch, step=9, make=lambda x: x * float("nan"))
    expected = r"non-finite loss in the steps up to step 12; .*\(step 9\) is unchanged"
    with pytest.raises(T.TrainingError, match=expected):
        T.train(one_thread_config(fake_cifar), out)
    assert load_checkpoint(out)["step"] == 9


@pytest.mark.slow
def test_checkpoint_every_steps_bounds_the_loss(fake_cifar, tmp_path, monkeypatch):
    out = tmp_path / "r"
    _train_killed_at(monkeypatch, 7, one_thread_config(fake_cifar, **{"train.checkpoint_every_steps": 3}), out)
    assert load_checkpoint(out)["step"] == 6  # not the evaluation at step 9
    T.train(one_thread_config(fake_cifar), out, resume=True)
    T.train(one_thread_config(fake_cifar), tmp_path / "full")
    _same_weights(out, tmp_path / "full")


# ---- torchrun: one download, no CUDA graphs


TORCHRUN_DRIVER = r"""
import dataclasses, json, os, sys, time
import torch
from conftest import write_fake_cifar10
from smallvit import data as D
from smallvit import train
from smallvit.datasets import DATASETS

sums, data, log, out = sys.argv[1:5]
DATASETS["cifar10"] = dataclasses.replace(DATASETS["cifar10"], md5=json.loads(open(sums).read()))
rank = os.environ["RANK"]

def download(root, info):  # the network, simulated: slow, and it says who called it
    with open(log, "a") as f:
        f.write(f"download {rank} start\n")
    time.sleep(1.0)
    write_fake_cifar10(root)
    with open(log, "a") as f:
        f.write(f"download {rank} end\n")

def compile_(model, mode=None):
    with open(log, "a") as f:
        f.write(f"compile {rank} {mode}\n")
    return model

D._download = download
torch.compile = compile_
from conftest import smoke_config
cfg = smoke_config(data, **{"data.download": True, "train.max_steps": 1, "train.compile": True,
                            "train.compile_mode": "max-autotune", "data.test_subset": 64})
train(cfg, out)
"""


@pytest.mark.slow
def test_torchrun_downloads_once_and_compiles_without_cuda_graphs(tmp_path):
    """2 gloo processes, data missing, download on: rank 0 downloads while rank 1 waits, then both train;
    compile_mode=max-autotune reaches torch.compile as max-autotune-no-cudagraphs on both ranks."""
    sums = tmp_path / "sums.json"
    sums.write_text(json.dumps(write_fake_cifar10(tmp_path / "scratch")))  # the same bytes the fake download writes
    driver, log, data = tmp_path / "driver.py", tmp_path / "log.txt", tmp_path / "data"
    driver.write_text(TORCHRUN_DRIVER)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), str(sums), str(data), str(log), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert [line for line in lines if line.startswith("download")] == ["download 0 start", "download 0 end"]
    assert sorted(line for line in lines if line.startswith("compile")) == [
        "compile 0 max-autotune-no-cudagraphs", "compile 1 max-autotune-no-cudagraphs"]
    assert "runs as max-autotune-no-cudagraphs" in p.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["world_size"] == 2
