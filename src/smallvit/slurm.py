"""SLURM through submitit: a study as one job array, one run on many GPUs or nodes, checkpoint and requeue.

submitit (what DeiT, ConvNeXt, MAE and DINO launch with) writes the sbatch file, pickles the call, asks SLURM for
its warning signal (`--signal=USR2@delay`) and requeues a `Checkpointable` job. What it leaves to us is here:
checks before anything is submitted, job states without SLURM accounting (submitit's own state query needs
`sacct`), the torch.distributed environment of a multi-task job, and stopping `train()` at a step boundary
before the requeue. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import Config, ConfigError, apply_overrides
from .lifecycle import run_state
from .runs import RunLock, atomic_write_json, check_run_folder

JOBS = "jobs.json"  # in the submitit folder: which SLURM job ran which run folder
SLURM_DIR = "slurm"  # the submitit folder inside a study or run folder: sbatch files, pickles, logs


class SlurmError(ConfigError):
    """The cluster cannot take the request (no sbatch, no controller, a bad partition or resources)."""


def _submitit():
    """submitit, imported only when a job is submitted or read: the options, local studies and `--help` work
    without it (an optional dependency: `pip install smallvit[slurm]`)."""
    try:
        import submitit
    except ImportError:
        raise SlurmError("--launcher slurm needs submitit, which is not installed: pip install 'smallvit[slurm]' "
                         "(or pip install submitit)") from None
    return submitit


@dataclass(frozen=True)
class Resources:
    """What one run asks SLURM for: one task (process) per GPU on each node, or one task without GPUs."""

    partition: str | None = None  # None: the cluster's default partition
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    mem_gb: float | None = None  # per node; None: the partition's default
    timeout_min: int = 24 * 60
    max_parallel: int = 256  # job-array throttle (sbatch --array=0-N%max_parallel)
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit: time to finish a step and save
    max_requeues: int = 3  # requeues after time limits (preemptions are not counted, as in submitit)
    sbatch: tuple[str, ...] = ()  # other sbatch options as KEY=VALUE (or a bare KEY for a flag)
    job_name: str = "smallvit"

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node)  # one process per GPU; one process on a CPU-only node


# ---- checks before anything is submitted


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer in {timeout:.0f} s: the SLURM controller is unreachable "
                         f"or overloaded; nothing was submitted") from None


def _first_error(p: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "failure" in ln.lower()]
    return (errors or lines or [f"exit code {p.returncode}"])[0]


def partitions() -> dict[str, dict]:
    """Partitions of the cluster: name -> {"default", "up", "nodes"}; one clear error when SLURM is unreachable."""
    missing = [c for c in ("sbatch", "squeue", "sinfo", "scontrol", "srun") if shutil.which(c) is None]
    if missing:
        raise SlurmError(f"--launcher slurm needs the SLURM client commands, and {', '.join(missing)} is not on PATH: "
                         f"run on a login node of the cluster (scripts/slurm-local.sh start makes a one-node test "
                         f"cluster); nothing was submitted")
    p = _run(["sinfo", "-h", "-o", "%P|%a|%D"], timeout=60)
    if p.returncode != 0:
        raise SlurmError(f"cannot reach the SLURM controller ({_first_error(p)}); check `scontrol ping` and "
                         f"$SLURM_CONF; nothing was submitted")
    parts: dict[str, dict] = {}
    for line in p.stdout.split():  # one line per partition, or per partition and node state: sum the nodes
        name, avail, nodes = line.split("|")
        part = parts.setdefault(name.rstrip("*"), {"default": name.endswith("*"), "up": avail == "up", "nodes": 0})
        part["nodes"] += int(nodes)
    return parts


def check_request(res: Resources, folder: Path, executor) -> None:
    """Partition, resources and folder, checked with `sbatch --test-only` on the very sbatch file submitit writes."""
    parts = partitions()
    name = res.partition or next((n for n, p in parts.items() if p["default"]), None)
    if name not in parts:
        what = (f"partition {res.partition!r} does not exist" if res.partition
                else "the cluster has no default partition")
        raise SlurmError(f"{what}; choose --partition from: {', '.join(parts) or 'none'}; nothing was submitted")
    if not parts[name]["up"]:
        raise SlurmError(f"partition {name!r} is not up (sinfo); choose another --partition; nothing was submitted")
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as script:
        script.write(executor._make_submission_file_text("true", "preflight"))
        script.flush()
        p = _run(["sbatch", "--test-only", script.name])
    if p.returncode != 0:
        raise SlurmError(f"SLURM refuses the request ({_first_error(p)}): partition {name}, {res.nodes} node(s), "
                         f"{res.gpus_per_node} GPU(s) and {res.tasks_per_node} task(s) per node, {res.cpus_per_task} "
                         f"CPU(s) per task, memory {f'{res.mem_gb:g} GB' if res.mem_gb else 'default'}, "
                         f"{res.timeout_min} min; nothing was submitted")
    _check_shared(folder, parts[name]["nodes"])


def _check_shared(folder: Path, nodes: int) -> None:
    """The folder must be seen by every node; where it is surely node-local (tmpfs, /tmp) on a multi-node
    partition, refuse before submitting (SLURM would fail silently: jobs could not even write their logs)."""
    if nodes <= 1:
        return
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, point, fstype, *_ = line.split()
            mounts.append((point, fstype))
    real = str(folder.resolve())
    point, fstype = max(((p, t) for p, t in mounts if real == p or real.startswith(p.rstrip("/") + "/")),
                        key=lambda m: len(m[0]), default=("/", "?"))
    where = (f"on {fstype} (at {point}), which is in memory on each node" if fstype in ("tmpfs", "ramfs") else
             "under a temporary folder, which is node-local on clusters"
             if real.startswith(("/tmp/", "/var/tmp/", "/dev/shm/")) else "")
    if where:
        raise SlurmError(f"{folder} is {where}, but the partition has {nodes} nodes: put --root/--out on a filesystem "
                         f"every node mounts; nothing was submitted")


# ---- the job


def distributed_env(env) -> dict[str, str]:
    """torch.distributed's environment from submitit's JobEnvironment (empty for a one-task job)."""
    if env.num_tasks <= 1:
        return {}
    # A port from the job id: two jobs that share a first node do not collide.
    port = 20000 + int(env.raw_job_id) % 20000
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes), "MASTER_ADDR": env.hostnames[0],
            "MASTER_PORT": str(port)}


def _job_state(job_id: str) -> str:
    p = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else "UNKNOWN"


class RunJob:
    """One run as a SLURM job: train with resume, so the first start, a requeue and a rerun are the same call.

    On SLURM's warning signal (time limit, or a preemption with PreemptParameters=send_user_signal) or on a
    SIGTERM while the job is still RUNNING (`scancel --signal=TERM`, a preemption signal), train() finishes its
    step and writes its checkpoint, then submitit's handler requeues the job (the default `checkpoint()`
    resubmits this same call). A plain `scancel` (the job is no longer RUNNING) stops without a requeue.
    Not a subclass of submitit.helpers.Checkpointable, so that this module imports without submitit: submitit
    requeues any callable with a `checkpoint` method, and this one is Checkpointable's.
    """

    def checkpoint(self, *args, **kwargs):
        """Resubmit the same call with the same arguments (submitit.helpers.Checkpointable.checkpoint)."""
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self, cfg: Config, folder: str) -> dict:
        from .train import train

        submitit = _submitit()
        env = submitit.JobEnvironment()
        os.environ.update(distributed_env(env))
        os.environ.setdefault("TQDM_MININTERVAL", "30")  # the progress bar is the job log's last line, not its bulk
        if cfg.train.threads == 0:  # task/none clusters bind no CPUs: torch would start a thread per core of the node
            cfg = apply_overrides(cfg, {"train.threads": int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))})
        result = train(cfg, folder, resume=True)
        if result["status"] == "interrupted":
            stop = result.get("stop_signal")
            handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue, restored by train()
            requeue = stop == "SIGUSR2" or (stop != "SIGINT" and _job_state(env.job_id) == "RUNNING")
            if requeue and callable(handler) and hasattr(handler, "__self__"):
                handler(signal.SIGUSR2, None)  # rank 0: requeue and exit; other ranks: return, the requeue ends them
            elif env.global_rank == 0:
                raise submitit.core.utils.UncompletedJobError(
                    f"{folder}: interrupted by {stop or 'another rank'} at step {result['step']} and not requeued "
                    f"(job {_job_state(env.job_id).lower()}); the checkpoint is saved: submit it again to resume")
        return {k: result.get(k) for k in ("status", "final_test_acc", "best_test_acc", "step", "run_dir")}


# ---- submission


def executor(folder: Path, res: Resources):
    """A submitit SlurmExecutor for `res`, with its files in `folder`."""
    ex = _submitit().SlurmExecutor(folder=folder, max_num_timeout=res.max_requeues)
    extra = {}
    for item in res.sbatch:
        key, _, value = item.lstrip("-").partition("=")
        extra[key.replace("_", "-")] = value if value else True
    params = {"job_name": res.job_name, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
              "cpus_per_task": res.cpus_per_task, "time": res.timeout_min, "array_parallelism": res.max_parallel,
              "signal_delay_s": res.signal_delay_s, "stderr_to_stdout": True, "additional_parameters": extra}
    if res.partition:
        params["partition"] = res.partition
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = f"{int(res.mem_gb * 1024)}M"
    try:
        ex.update_parameters(**params)
    except ValueError as e:
        raise SlurmError(f"bad sbatch option in --sbatch {' '.join(res.sbatch)}: {str(e).splitlines()[0]}") from None
    return ex


@contextlib.contextmanager
def _submission_env():
    """The login shell's CUDA_VISIBLE_DEVICES must not reach the jobs (sbatch exports the environment):
    SLURM sets it from each job's GPU allocation, and a job without GPUs must see none of the node's."""
    saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def submit(runs: list[tuple[str, Config, Path]], folder: Path, res: Resources) -> list[str]:
    """Submit (key, config, run folder) runs as one job array (one job when there is one run); return job ids."""
    submitit = _submitit()
    folder = folder.resolve()
    ex = executor(folder, res)
    check_request(res, folder, ex)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _submission_env():
            jobs = ex.map_array(RunJob(), [cfg for _, cfg, _ in runs], [str(f.resolve()) for _, _, f in runs])
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:  # after --test-only
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise SlurmError(f"sbatch failed: {lines[0] if lines else e}; nothing was submitted") from None
    record = read_jobs(folder)
    now = time.time()
    for (key, _, run_folder), job in zip(runs, jobs):
        record[key] = {"job_id": job.job_id, "folder": str(run_folder.resolve()), "submitted": now,
                       "tasks": res.nodes * res.tasks_per_node}
    atomic_write_json(folder / JOBS, record)
    return [j.job_id for j in jobs]


def read_jobs(folder: Path) -> dict:
    path = Path(folder) / JOBS
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- state without accounting: squeue (jobs still known to the controller), submitit's files, the run folder


def squeue_states(job_ids: list[str]) -> dict[str, dict]:
    """job id -> {"state", "reason", "restarts"} for the jobs the controller still knows (MinJobAge after the end)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-O",
                            "JobArrayID:40,State:24,RestartCnt:8,Reason:60"], capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        return {}
    out = {}
    for line in p.stdout.splitlines() if p.returncode == 0 else []:
        parts = line.split()
        if len(parts) >= 3:
            out[parts[0]] = {"state": parts[1], "restarts": int(parts[2]), "reason": " ".join(parts[3:])}
    return out


def _last_line(path: Path) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 8192))
        text = f.read().decode(errors="replace")
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _job_error(folder: Path, job_id: str) -> str | None:
    """The error of a finished job from submitit's result pickle (task 0), None if it succeeded or left none."""
    submitit = _submitit()
    path = submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=0).result_pickle
    if not path.is_file():
        return None
    with contextlib.suppress(Exception):
        outcome, value = submitit.core.utils.pickle_load(path)
        if outcome == "error":  # a traceback: its exception line, with the lines of a multi-line message
            lines = [ln for ln in str(value).strip().splitlines() if ln.strip()]
            starts = [i for i, ln in enumerate(lines) if re.match(r"[A-Za-z_][\w.]*: ", ln)]
            return " ".join(lines[starts[-1] if starts else -1:]) if lines else "error"
        return None
    return "unreadable result file"


def run_status(key: str, run_folder: Path, local: str, slurm_folder: Path, jobs: dict, queue: dict) -> dict:
    """One row of --status from the run folder's state (done/partial/new) and its job's: state, job id, last log
    line, and for a failed run its log and error."""
    job = jobs.get(key)
    row = {"run": key, "folder": str(run_folder), "job_id": job["job_id"] if job else "", "log": "", "error": ""}
    if job:
        row["log"] = str(_submitit().core.utils.JobPaths(slurm_folder, job_id=job["job_id"], task_id=0).stdout)
    q = queue.get(row["job_id"]) if job else None
    if local == "done":
        state = "done"
    elif q and q["state"] in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"):
        state = "requeued" if q["restarts"] or q["state"].startswith("REQUEUE") else "queued"
    elif q and q["state"] in ("RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "STAGE_OUT", "SIGNALING"):
        state = "running"
    elif job:  # the job has ended (or the controller has forgotten it, MinJobAge after its end)
        error = _job_error(slurm_folder, job["job_id"]) or ""
        stopped = "UncompletedJobError" in error or (q and q["state"] in ("CANCELLED", "PREEMPTED", "TIMEOUT"))
        if q and q["state"] not in ("COMPLETED", "CANCELLED", "PREEMPTED", "TIMEOUT") and not error:
            error = f"SLURM state {q['state']} ({q['reason']})"
        if not Path(row["log"]).is_file():
            error = f"the job left no log in {slurm_folder}: is the folder on a filesystem every node mounts?"
        if local == "partial" and (stopped or not error):
            state = "interrupted"
            error = f"{error or 'stopped'}; the checkpoint is kept: submit the study again to resume"
        else:
            state = "failed"
            error = error or "the job ended without a result"
        row["error"] = error
    else:
        state = {"partial": "interrupted", "new": "not submitted"}[local]
    row["state"] = state
    row["last"] = _last_line(Path(row["log"])) if job else ""
    return row


def format_status(rows: list[dict], title: str) -> str:
    """The --status table: one line per run, then the log path and error of every failed run."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = [f"{title}: {len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    width = max([len(r["run"]) for r in rows] + [3])
    lines.append(f"{'run':{width}s}  {'state':13s}  {'job':12s}  last log line")
    for r in rows:
        lines.append(f"{r['run']:{width}s}  {r['state']:13s}  {r['job_id'] or '-':12s}  {r['last'][:100]}")
    for r in rows:
        if r["state"] in ("failed", "interrupted") and r["error"]:
            lines.append(f"  {r['run']} {r['state']}: {r['error']}" + (f"\n    log: {r['log']}" if r["log"] else ""))
    return "\n".join(lines)


def live(key: str, jobs: dict, queue: dict) -> bool:
    """Whether the run's job is still queued or running (do not submit it twice)."""
    job = jobs.get(key)
    q = queue.get(job["job_id"]) if job else None
    return bool(q) and q["state"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait(folder: Path, keys: list[str], poll_s: float = 2.0) -> None:
    """Block until none of these runs' jobs is queued or running."""
    jobs = read_jobs(folder)
    ids = [jobs[k]["job_id"] for k in keys if k in jobs]
    while True:
        queue = squeue_states(ids)
        if not any(live(k, jobs, queue) for k in keys):
            return
        time.sleep(poll_s)


def submit_study(todo: list[tuple[str, Config, Path]], folder: Path, res: Resources, wait_: bool = False) -> None:
    """Submit a study's unfinished runs as one job array, except those whose job is still queued or running."""
    if not todo:
        return
    partitions()  # one clear error first when SLURM is missing or unreachable
    jobs = read_jobs(folder)
    queue = squeue_states([j["job_id"] for j in jobs.values()])
    busy = [key for key, _, _ in todo if live(key, jobs, queue)]
    if busy:
        print(f"{len(busy)} runs already queued or running, not submitted again: {', '.join(busy)}", flush=True)
    new = [run for run in todo if run[0] not in busy]
    if new:
        ids = submit(new, folder, res)
        print(f"submitted {len(ids)} runs as SLURM job {ids[0].split('_')[0]} (an array, at most {res.max_parallel} "
              f"at once); submitit files and logs in {folder.resolve()}", flush=True)
    if wait_:
        wait(folder, [key for key, _, _ in todo])


def submit_train(cfg: Config, out: Path, args) -> int:
    """`smallvit train --launcher slurm`: one job of nodes x GPUs processes on the run folder `out`."""
    res = resources(args, "smallvit-train")
    world = res.nodes * res.tasks_per_node
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by the "
                          f"{world} processes ({res.nodes} node(s) x {res.tasks_per_node}); nothing was submitted")
    out = out.resolve()
    with RunLock(out):  # refused while another process writes there; the job takes the lock again when it starts
        finished = check_run_folder(out, cfg, args.resume)  # the same refusal as a local run's
    if finished is not None:
        print(f"{out} holds a finished run; nothing to do")
        return 0
    folder = out / SLURM_DIR
    (job_id,) = submit([("run", cfg, out)], folder, res)
    log = _submitit().core.utils.JobPaths(folder, job_id=job_id, task_id=0).stdout
    print(f"submitted SLURM job {job_id}: {world} process(es), {res.nodes} node(s) x {res.tasks_per_node}; "
          f"log {log}; follow with squeue -j {job_id}", flush=True)
    if not args.wait:
        return 0
    wait(folder, ["run"])
    if (out / "result.json").is_file():
        result = json.loads((out / "result.json").read_text())
        print(json.dumps({k: result[k] for k in ("final_test_acc", "best_test_acc", "step", "world_size")}))
        return 0
    row = run_status("run", out, run_state(out), folder, read_jobs(folder), squeue_states([job_id]))
    print(format_status([row], f"job {job_id}"))
    return 1


# ---- command line


def add_arguments(p: argparse.ArgumentParser, per_run: bool, launchers=("local", "slurm")) -> None:
    """--launcher (one of `launchers`, launchers.py's) and the SLURM options: per run for a study (one task each),
    per node for `train`."""
    d = Resources()
    g = p.add_argument_group("SLURM (--launcher slurm, see docs/cluster.md)")
    g.add_argument("--launcher", default="local", choices=list(launchers),
                   help="local: this machine; slurm: submit through submitit (sbatch)")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    if per_run:
        g.add_argument("--gpus-per-run", type=int, default=d.gpus_per_node, help="GPUs of each run")
        g.add_argument("--cpus-per-run", type=int, default=d.cpus_per_task, help="CPUs of each run")
        g.add_argument("--max-parallel", type=int, default=d.max_parallel, help="runs at once (job-array throttle)")
    else:
        g.add_argument("--nodes", type=int, default=d.nodes)
        g.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="one process per GPU")
        g.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="CPUs of each process")
    g.add_argument("--mem-gb", type=float, default=d.mem_gb, help="memory per node (default: the partition's)")
    g.add_argument("--timeout-min", type=int, default=d.timeout_min, help="time limit of each job")
    g.add_argument("--signal-delay-s", type=int, default=d.signal_delay_s,
                   help="SLURM signals the job this long before its time limit, to checkpoint and requeue")
    g.add_argument("--sbatch", nargs="*", default=[], metavar="KEY=VALUE",
                   help="other sbatch options, e.g. account=vision qos=high constraint=a100 exclusive")
    g.add_argument("--wait", action="store_true", help="after submitting, wait until the jobs have ended")


def resources(args, name: str) -> Resources:
    """Resources from the parsed options of add_arguments."""
    per_run = hasattr(args, "gpus_per_run")
    res = Resources(partition=args.partition, mem_gb=args.mem_gb, timeout_min=args.timeout_min,
                    signal_delay_s=args.signal_delay_s, sbatch=tuple(args.sbatch), job_name=name)
    if per_run:
        res = replace(res, gpus_per_node=args.gpus_per_run, cpus_per_task=args.cpus_per_run,
                      max_parallel=args.max_parallel)
    else:
        res = replace(res, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task)
    for field in ("nodes", "cpus_per_task", "max_parallel", "timeout_min"):
        if getattr(res, field) < 1:
            raise ConfigError(f"--{field.replace('_', '-')} must be at least 1, got {getattr(res, field)}")
    if res.gpus_per_node < 0 or res.signal_delay_s < 0:
        raise ConfigError("--gpus-per-run/--gpus-per-node and --signal-delay-s must not be negative")
    return res
