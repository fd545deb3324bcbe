"""Time budget stage: `stp train --minutes M`, training for a wall-clock budget instead of a count of epochs.

Epochs mean little on their own: on 2 CPU cores ten epochs of a few hundred patches are a minute, of a few
hundred thousand a day. With a budget the run trains for at most M minutes of training wall time (the loop's,
set-up excluded; a resumed run counts the time its earlier sessions spent, kept in the backup) and ends the
epoch under way when the budget is spent, so the run folder is the one of any finished run: history.csv,
best/last.keras and curves.png end at the same epoch, the backup is removed, and run.json records the budget
(`budget`: minutes, seconds used, epochs and steps run, and why it stopped). `--epochs` then caps the
epochs (default: no cap that matters).

The stopping rule: the run uses the whole budget. Within an epoch the clock is read every few steps (every
`CHECK_EVERY` before the rate is measured, then about every `CHECK_SECONDS` of steps) and the epoch ends
at the first reading where the budget is spent; at an epoch end the run stops when not one more step
fits. That last, shorter epoch is recorded as an epoch (`budget.stopped` says "budget, within an epoch",
`budget.last_epoch_steps` how many steps it ran, and `stp train`'s last lines say so), validated and saved like
any other: with no validation split its training figures are over those few steps only, and may jump either
way in history.csv and curves.png. (Stopping at the last whole epoch that fits wasted up to an epoch:
on the enhancement benchmark, 7 of 15 minutes, as one epoch of 219 steps took 8.) The learning rate
follows the run's schedule (warmup, then cosine) over the steps the budget is expected to hold
(`BudgetSchedule`): the steps done plus the steps that still fit at the measured rate, estimated after
10 and 50 steps and at every epoch end, so the cosine reaches its floor as the budget runs out. Under
`--strategy multiworker` every worker must take the same decisions (the same learning rate, the same last
step): the times they decide on are averaged across workers first (`agree`).

Timed runs are not bit-reproducible (`--deterministic` still fixes the data order and the kernels, but where
the run stops, and the schedule, depend on the machine's speed).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import keras
import tensorflow as tf

from stpkeras.saving import PACKAGE

CLOCK = time.monotonic   # seconds; tests replace it with a simulated clock
ESTIMATE_AT = (10, 50)   # steps of the session after which the total is estimated before the first epoch ends
CHECK_EVERY = 50         # steps between readings of the clock before the step time is measured
CHECK_SECONDS = 5.0      # then: read the clock about this often (at least every step, at most every CHECK_EVERY)


@keras.saving.register_keras_serializable(package=PACKAGE)
class BudgetSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup over `warmup` of the expected steps to `peak`, then cosine decay to `alpha * peak`
    (`alpha` 1: held) at the expected last step; the expected steps live in a variable the loop updates
    (`Budget.estimate`), read when each step runs."""

    def __init__(self, peak: float, warmup: float, alpha: float, total_steps: int):
        self.peak, self.warmup, self.alpha = float(peak), float(warmup), float(alpha)
        self.total_steps = tf.Variable(float(max(total_steps, 1)), trainable=False, dtype=tf.float32,
                                       name="budget_total_steps")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        total = tf.maximum(self.total_steps, 1.0)
        warm = self.warmup * total
        rising = self.peak * step / tf.maximum(warm, 1.0)
        progress = tf.clip_by_value((step - warm) / tf.maximum(total - warm, 1.0), 0.0, 1.0)
        decayed = self.peak * (self.alpha + (1.0 - self.alpha) * 0.5 * (1.0 + tf.cos(math.pi * progress)))
        return tf.where(step < warm, rising, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup": self.warmup, "alpha": self.alpha,
                "total_steps": int(self.total_steps.numpy())}


class Budget:
    """The clock and the decisions of a timed run; `fit`'s callback and the custom loop call it alike.

    `steps` per epoch, `cap_epochs` the most epochs (`--epochs`), `schedule` the `BudgetSchedule` whose
    expected steps it sets, `spent` the seconds earlier sessions of this run used, `agree` maps this
    process's clock reading to the one every worker decides on (identity on one machine).
    """

    def __init__(self, minutes: float, steps: int, cap_epochs: int, schedule: BudgetSchedule, *,
                 initial_epoch: int = 0, spent: float = 0.0, agree: Callable[[float], float] = float):
        self.seconds, self.steps, self.cap_epochs, self.schedule = minutes * 60.0, steps, cap_epochs, schedule
        self.initial_epoch, self.spent, self.agree = initial_epoch, float(spent), agree
        self.started: Optional[float] = None
        self.first_step_done: Optional[float] = None   # the clock after the session's first step (tracing excluded)
        self.session_steps = 0
        self.check_every = CHECK_EVERY
        self.per_step: Optional[float] = None
        self.epochs_run = 0
        self.epoch_began = 0     # session_steps when the epoch under way began
        self.last_epoch_steps = 0
        self.stopped = "epochs"

    def start(self) -> None:
        self.started = CLOCK()

    def elapsed(self) -> float:
        """Training seconds of the whole run so far, as every worker agrees on them."""
        return self.agree(self.spent + CLOCK() - self.started)

    def after_step(self) -> bool:
        """Call after every training step (cheap); estimates the total at the first `ESTIMATE_AT` steps.
        True: the budget is spent in the middle of an epoch (read every `check_every` steps): end the
        epoch here."""
        self.session_steps += 1
        if self.session_steps == 1:
            self.first_step_done = CLOCK()
        elif self.session_steps in ESTIMATE_AT and self.epochs_run == 0:
            self._measured(self.agree(CLOCK() - self.first_step_done) / (self.session_steps - 1))
            self._expect(self.elapsed(), self.initial_epoch * self.steps + self.session_steps)
        if self.session_steps % self.check_every == 0 and self.elapsed() >= self.seconds:
            self.stopped = "budget, within an epoch"
            return True
        return False

    def after_epoch(self, epochs_done: int) -> bool:
        """Call after every finished epoch (`epochs_done` counts the run's); True: stop here."""
        self.epochs_run += 1
        self.last_epoch_steps, self.epoch_began = self.session_steps - self.epoch_began, self.session_steps
        elapsed = self.elapsed()
        if self.stopped == "budget, within an epoch":
            return True
        if epochs_done >= self.cap_epochs:
            self.stopped = "epochs"
            return True
        self._measured((elapsed - self.spent) / max(self.session_steps, 1))
        self._expect(elapsed, epochs_done * self.steps)
        if elapsed + self.per_step > self.seconds:
            self.stopped = "budget"
            return True
        return False

    def _measured(self, per_step: float) -> None:
        """A step's seconds, as every worker agrees on them; sets how often the clock is read."""
        self.per_step = max(per_step, 1e-9)
        self.check_every = int(min(max(CHECK_SECONDS // self.per_step, 1), CHECK_EVERY))

    def _expect(self, elapsed: float, done: int) -> None:
        """Sets the schedule's expected steps: the `done` steps of the run plus those that still fit, at most
        `cap_epochs` epochs."""
        fit = int(max(self.seconds - elapsed, 0.0) // self.per_step)
        total = min(max(done + fit, 1), self.cap_epochs * self.steps)
        self.schedule.total_steps.assign(float(total))

    def state(self) -> dict:
        """What the backup keeps for a resumed run: the seconds used and the steps expected."""
        return {"train_seconds": round(self.elapsed(), 3),
                "expected_steps": int(self.schedule.total_steps.numpy())}

    def record(self) -> dict:
        """run.json's `budget` (`last_epoch_steps` where the budget ended the last epoch early)."""
        record = {"minutes": self.seconds / 60.0, "train_seconds": round(self.elapsed(), 2),
                  "epochs_this_session": self.epochs_run, "steps_per_epoch": self.steps,
                  "expected_steps": int(self.schedule.total_steps.numpy()), "stopped": self.stopped}
        if self.stopped == "budget, within an epoch":
            record["last_epoch_steps"] = self.last_epoch_steps
        return record


def summary(record: dict) -> str:
    """One line for `stp train` from run.json's `budget`: the minutes used and what ended the run (the epoch
    cap, the budget at an epoch's end, or the budget within an epoch, and then how much of it ran)."""
    reason = "the epoch cap (--epochs)" if record["stopped"] == "epochs" else f"the {record['stopped']}"
    if "last_epoch_steps" in record:
        reason += (f": the last epoch ran {record['last_epoch_steps']} of {record['steps_per_epoch']} steps"
                   " (its training figures are over those steps only)")
    return f"budget {record['minutes']:g} min: {record['train_seconds'] / 60:.1f} min of training, stopped by {reason}"
