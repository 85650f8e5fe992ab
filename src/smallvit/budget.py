"""A wall-time budget (train.time_budget_s): how many steps fit, decided once from the measured step rate.

The run trains its first steps (inside the learning-rate warm-up, whose shape does not depend on the run's length),
measures the seconds per step, then fixes the total number of steps so that the whole command (imports, data,
training, evaluations and the final test included) ends within the budget, less a safety margin. Every schedule
(learning rate, decay, EMA, evaluations) is then defined on that count, and the decision is written to the run
folder and the checkpoint, so a resumed run continues the same schedule and two runs on one machine can be compared.
If the machine slows down after the decision, the run ends early (at a log step, with its final evaluation) rather
than overrun the budget, and result.json says where (`budget_cut_at_step`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

_IMPORTED = time.time()  # fallback start of the command where /proc is absent


def command_seconds() -> float:
    """Seconds since this process started (Linux: its start time in /proc), else since smallvit was imported."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


_claimed = False  # whether a run in this process has already counted the process's start-up as its own


def started_at() -> float:
    """The perf_counter time a run's budget counts from: the process's start for the first run in a process (the
    command's imports count), the call itself for later ones (the next run of a study in the same process)."""
    global _claimed
    now = time.perf_counter()
    if _claimed:
        return now
    _claimed = True
    return now - command_seconds()


def measure_steps(warmup_steps: int) -> int:
    """The step at which to decide: enough steps for a stable rate (after the untimed first one), and before the
    warm-up ends, so that no step before the decision used a learning rate that depends on the run's length."""
    return max(2, min(30, warmup_steps - 1))


@dataclass(frozen=True)
class Decision:
    budget_s: float
    decided_at_step: int
    elapsed_s: float  # wall time of the command when deciding
    step_s: float  # measured seconds per training step
    eval_s: float  # estimated seconds of one evaluation during training
    final_s: float  # estimated seconds of the last evaluation (and the test set, with a validation split)
    margin_s: float
    total_steps: int
    steps_per_epoch: int
    capped: bool  # the budget allowed more than train.epochs: the run stops at train.epochs

    @property
    def passes(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        why = ("train.epochs caps it" if self.capped else
               f"{self.budget_s:.0f} s budget, {self.elapsed_s:.0f} s spent, {self.step_s * 1e3:.0f} ms a step, "
               f"{self.final_s:.0f} s for the final evaluation, {self.margin_s:.0f} s margin")
        return f"time budget: {self.total_steps} steps ({self.passes:.2f} passes) ({why})"


def decide(budget_s: float, elapsed_s: float, step: int, step_s: float, eval_s: float, final_s: float,
           evals_per_step: float, max_steps: int, steps_per_epoch: int) -> Decision:
    """The total number of steps that ends within `budget_s`: the time left (less a margin of 5% of the budget and
    at least 5 s, for the checkpoints, the result and the process's exit) pays for the remaining steps, the
    evaluations they bring (`evals_per_step` of them per step) and the final evaluation, which always happens."""
    margin = max(5.0, 0.05 * budget_s)
    left = budget_s - elapsed_s - margin - final_s
    more = max(0, math.floor(left / (step_s + evals_per_step * eval_s))) if left > 0 else 0
    total = step + more
    return Decision(budget_s, step, elapsed_s, step_s, eval_s, final_s, margin, max(step, min(total, max_steps)),
                    steps_per_epoch, total >= max_steps)


def running_late(decision: Decision, elapsed_s: float, log_every_steps: int) -> bool:
    """Whether the run must end now to keep its budget: the step count is fixed when the run begins, but a machine
    that slows down later (another job on the cores) would overrun it. Checked at each log step: late when the
    wall time so far, one more log interval at the measured rate (half again, for the slowdown) and the final
    evaluation no longer fit."""
    interval = 1.5 * log_every_steps * decision.step_s
    return elapsed_s + interval + decision.final_s + 2.0 >= decision.budget_s


def from_dict(d: dict) -> Decision:
    return Decision(**d)
