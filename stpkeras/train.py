"""Train stage: a converted folder -> a run folder, under a `tf.distribute` strategy.

`train(config)` prepares the run once (`stpkeras.setup.prepare_run`), then steps it with Keras `fit`
(`fit` below), or, under `--strategy multiworker`, with the custom loop of `stpkeras.multiworker`. With a
time budget (`config.minutes`, `stpkeras.budget`) both stop at the last epoch boundary within it.

RUN_DIR layout (other stages rely on it):

    run.json      task, model, config, spec, labels, data path, manifest sha256, versions, metrics
    best.keras    the model of the best epoch (by the task's monitor, on validation when there is one)
    last.keras    the model after the last finished epoch
    history.csv   one row per epoch (Keras CSVLogger)
    logs/         TensorBoard
    curves.png    loss and metrics per epoch
    backup/       the state after the last finished epoch while a run is unfinished (`run_folder.save_backup`)

A run killed at any moment and started again with `resume=True` goes on
from the last finished epoch, with its weights, optimizer state and step count,
its layers' random state (dropout) and, with a seed, the rest of its training
data stream: a `deterministic` run killed and resumed ends with the weights of
one that was not killed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

from stpkeras import run_folder
from stpkeras.artifacts import BACKUP, BEST, CURVES, HISTORY, LAST, LOGS, RUN_JSON, read_history  # noqa: F401
from stpkeras.run_folder import RunError, versions  # noqa: F401  (public here: the CLI and tests import them)
from stpkeras.setup import (SCHEDULES, STRATEGIES, Run, TrainConfig, configure_devices,  # noqa: F401
                            learning_rate, make_strategy, prepare_run)
from tfrecords_tools import outputs


# --- training -------------------------------------------------------------------------------------

def train(config: TrainConfig, echo: Callable[[str], None] = print) -> dict:
    """Trains `config.model` on `config.data` into `config.out`; returns run.json's content.

    Holds DATA for reading and RUN_DIR for writing (`tfrecords_tools.outputs`) for the whole run: a
    conversion into DATA, or a second run into RUN_DIR, is refused (`OutputBusyError`), and so is this
    run while DATA is being written. Under multiworker, workers share RUN_DIR: only DATA is held.
    """
    outputs.check_not_input(config.out, [config.data])
    with contextlib.ExitStack() as held:
        held.enter_context(outputs.reading(config.data))
        if config.strategy != "multiworker":
            held.enter_context(outputs.writing(config.out))
        run = prepare_run(config)
        if config.strategy == "multiworker":
            # Keras 3's fit cannot run under MultiWorkerMirroredStrategy (see multiworker.py).
            from stpkeras.multiworker import train_custom
            return train_custom(run, echo)
        return fit(run, echo)


def fit(run: Run, echo: Callable[[str], None] = print) -> dict:
    """Steps a prepared run with Keras `fit`; writes the run folder; returns run.json's content."""
    import keras

    config, model, task = run.config, run.model, run.task
    record = run.record("keras fit")
    run_folder.write_run_json(config.out, record)
    echo(run.describe())
    callbacks = [
        # CSV first and the backup last: when the backup says an epoch is done,
        # its row, checkpoints and curves are written too.
        keras.callbacks.CSVLogger(os.path.join(config.out, HISTORY), append=True),
        keras.callbacks.ModelCheckpoint(os.path.join(config.out, BEST), monitor=run.monitor,
                                        mode=task.monitor_mode, save_best_only=True,
                                        initial_value_threshold=run.best_so_far()),
        keras.callbacks.ModelCheckpoint(os.path.join(config.out, LAST)),
        keras.callbacks.TensorBoard(os.path.join(config.out, LOGS)),
        _curves_callback(config.out, run.reporter),
    ]
    if run.budget is not None:
        # Before the backup: the backup keeps the seconds used, and a stop decided here is the run's end.
        callbacks.append(_budget_callback(run.budget))
    callbacks.append(_backup_callback(run.backup_dir, run.budget))
    if config.data_service:
        from stpkeras.data_service import stall_warning_callback, trace_epoch_callback
        # A dead worker stalls the epoch until it is restarted: say so rather than hang in silence.
        callbacks.append(stall_warning_callback(config.data_service, echo=echo))
        if config.trace_dir:
            callbacks.append(trace_epoch_callback(run.trace_epoch))
    # shuffle=False: the pipeline already shuffles (files, then records); Keras cannot shuffle a Dataset.
    # A tf.data service dataset ends its epochs itself (each record once per epoch).
    model.fit(run.train_ds, validation_data=run.val_ds, epochs=config.epochs,
              steps_per_epoch=None if config.data_service else run.steps, initial_epoch=run.initial_epoch,
              callbacks=callbacks, class_weight=run.class_weight, verbose=config.verbose, shuffle=False)

    run_folder.write_run_json(config.out, run.finish(record, read_history(config.out), echo))
    return record


def _curves_callback(run_dir: str, reporter=None):
    """Redraws curves.png, and the task's own figure (`Task.reporter`) when it has one, as epochs finish
    (`run_folder.Curves`: bounded cost) and at the end of training."""
    import keras

    class CurvesCallback(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.curves, self.epochs = run_folder.Curves(run_dir), 0

        def on_epoch_end(self, epoch, logs=None):
            self.curves.update()
            self.epochs = epoch + 1
            if reporter is not None:
                reporter.update(self.model, self.epochs)

        def on_train_end(self, logs=None):
            self.curves.update(final=True)
            if reporter is not None:
                reporter.update(self.model, self.epochs, final=True)

    return CurvesCallback()


def _budget_callback(budget):
    """A timed run (`stpkeras.budget`): the clock starts with training; after an epoch the budget may end it."""
    import keras

    class BudgetCallback(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            budget.start()

        def on_train_batch_end(self, batch, logs=None):
            if budget.after_step():
                self.model.stop_training = True   # the epoch ends here; on_epoch_end then ends the run

        def on_epoch_end(self, epoch, logs=None):
            if budget.after_epoch(epoch + 1):
                self.model.stop_training = True

    return BudgetCallback()


def _backup_callback(backup_dir: str, budget=None):
    """Saves the training state after every epoch (`run_folder.save_backup`), with a timed run's clock;
    removes it when training ends."""
    import keras

    class Backup(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            run_folder.save_backup(backup_dir, self.model, epoch + 1, budget.state() if budget is not None else None)

        def on_train_end(self, logs=None):
            run_folder.remove_backup(backup_dir)

    return Backup()
