"""Train stage across machines: a custom training loop under `MultiWorkerMirroredStrategy` (TF_CONFIG).

Why not `Model.fit`: with Keras 3 (checked on 3.15.1 + TF 2.21) `fit` under
`MultiWorkerMirroredStrategy` fails before the first step. It builds the
model from the first distributed batch by `strategy.reduce("MEAN", batch)`
(`keras/src/backend/tensorflow/trainer.py`, `_maybe_symbolic_build`), and
the collective strategy cannot reduce a `PerReplica` of input tensors
eagerly: "ValueError: Attempt to convert a value (PerReplica:{...}) with an
unsupported type ... to a Tensor" (keras-team/keras#20585). Everything else
Keras brings works under the strategy (the model, AdamW, which all-reduces
the gradients in replica context, losses, metrics, `.keras` saving), so
this loop replaces only `fit`'s stepping: `strategy.run(step)` per batch
inside one `tf.function`, metrics read (all-reduced) once per epoch.

Everything else comes prepared by `stpkeras.setup.prepare_run`, as for `fit`: the task with its
options, the compiled model (AdamW on the warmup schedule, mixed precision: the loss is scaled where
the optimizer scales it; XLA: the forward and backward pass are one compiled function), the class
weights (as `fit` applies them: a weight per sample on the loss and the metrics), the backup and the
datasets. What this loop cannot do (a tf.data service) `TrainConfig` refuses.

Every worker runs this same code. Only the chief (task `chief`, else
`worker` 0) writes the run folder (run.json, history.csv, best/last.keras,
curves.png); every worker keeps its own backup in `RUN_DIR/backup/TYPE-INDEX`
(`run_folder.save_backup`, at the end of each epoch), so a restarted cluster goes on
from the last epoch every worker finished.

Data: each worker runs its own copy of `make_dataset`; `tf.distribute`
shards it by file (or by record when there are fewer files than workers,
see `pipeline.shard_policy`), so each record is read by one worker. An
epoch is `records // global batch` steps on every worker; when the batch
divides the records and the shards are even (or sharding is by record),
every record is seen exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List

from stpkeras import run_folder
from stpkeras.artifacts import BEST, HISTORY, LAST, read_history
from stpkeras.setup import Run
from tfrecords_tools import schema


def train_custom(run: Run, echo: Callable[[str], None] = print) -> dict:
    """Steps a prepared multi-worker run; returns run.json's content (on every worker)."""
    import keras
    import tensorflow as tf

    config, model, task, strategy, worker = run.config, run.model, run.task, run.strategy, run.worker
    optimizer, loss_fn, replicas = model.optimizer, model.loss, run.replicas
    train_batches = iter(strategy.experimental_distribute_dataset(run.train_ds))
    val_batches = iter(strategy.experimental_distribute_dataset(run.val_ds)) if run.val_ds is not None else None
    with strategy.scope():
        train_metrics, val_metrics = task.metrics(run.labels), task.metrics(run.labels)
        loss_mean, val_loss_mean = keras.metrics.Mean(name="loss"), keras.metrics.Mean(name="val_loss")
        class_weight = (tf.constant([run.class_weight[i] for i in range(len(run.labels))], tf.float32)
                        if run.class_weight else None)

    def split(element):
        if isinstance(element, dict):
            return element[schema.PATCH], element[schema.LABEL], (element[schema.VIDEO_ID], element[schema.INDEX])
        return element[0], element[1], None

    def sample_weight(y):
        # As fit applies `class_weight`: each sample weighted by its class, in the loss and the metrics.
        return tf.gather(class_weight, tf.cast(y, tf.int32)) if class_weight is not None else None

    @tf.function(jit_compile=bool(model.jit_compile))
    def gradients(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            # A Keras 3 loss called in a replica context already divides its batch mean by the number
            # of replicas (keras.losses.Loss -> scale_loss_for_distribution), so the all-reduced (summed)
            # gradient is that of the mean over the global batch; the model's own losses get the same.
            loss = loss_fn(y, pred, sample_weight=sample_weight(y))
            if model.losses:
                loss += tf.add_n(model.losses) / replicas
            # Mixed float16: the optimizer (a LossScaleOptimizer) scales the loss, and unscales the gradients.
            scaled = optimizer.scale_loss(loss)
        return loss, pred, tape.gradient(scaled, model.trainable_variables)

    def replica_step(element):
        x, y, ids = split(element)
        loss, pred, grads = gradients(x, y)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        loss_mean.update_state(loss * replicas)
        for m in train_metrics:
            m.update_state(y, pred, sample_weight=sample_weight(y))
        return ids if ids is not None else tf.zeros([0])

    def replica_eval(element):
        x, y, _ = split(element)
        pred = model(x, training=False)
        val_loss_mean.update_state(loss_fn(y, pred) * replicas)
        for m in val_metrics:
            m.update_state(y, pred)

    @tf.function
    def train_step(element):
        return strategy.run(replica_step, args=(element,))

    @tf.function
    def eval_step(element):
        strategy.run(replica_eval, args=(element,))

    best = run.best_so_far() if worker.chief else None
    trace = None
    if config.trace_dir:
        os.makedirs(config.trace_dir, exist_ok=True)
        trace = open(os.path.join(config.trace_dir, f"{worker.type}-{worker.index}.jsonl"), "a")
    record = run.record("custom (multiworker.py)")
    if worker.chief:
        run_folder.write_run_json(config.out, record)
    echo(run.describe())

    history: Dict[str, List[float]] = {"epoch": []}  # this session's epochs, for a worker without history.csv
    curves = run_folder.Curves(config.out)
    budget = run.budget
    if budget is not None:
        budget.start()
    done = run.initial_epoch
    for epoch in range(run.initial_epoch, config.epochs):
        done = epoch + 1
        for m in [loss_mean, val_loss_mean] + train_metrics + val_metrics:
            m.reset_state()
        for _ in range(run.steps):
            ids = train_step(next(train_batches))
            if budget is not None and budget.after_step():
                break   # every worker alike (the clock is agreed): the budget ends this epoch here
            if trace is not None:
                for local in strategy.experimental_local_results(ids):
                    if isinstance(local, tuple):
                        video_ids, grid = local
                        trace.write(json.dumps({"epoch": epoch, "records": [
                            [v.decode(), *map(int, g)] for v, g in zip(video_ids.numpy(), grid.numpy())]}) + "\n")
        if val_batches is not None:
            for _ in range(run.val_steps):
                eval_step(next(val_batches))
        logs = {"loss": float(loss_mean.result())}
        logs.update({m.name: float(m.result()) for m in train_metrics})
        if val_batches is not None:
            logs["val_loss"] = float(val_loss_mean.result())
            logs.update({"val_" + m.name: float(m.result()) for m in val_metrics})
        history["epoch"].append(float(epoch))
        for k, v in logs.items():
            history.setdefault(k, []).append(v)
        if trace is not None:
            trace.flush()
        if worker.chief:
            # As fit's callbacks, in their order: the history row, the checkpoints, the curves, then the backup.
            run_folder.append_history(os.path.join(config.out, HISTORY), epoch, logs)
            if run_folder.is_better(logs.get(run.monitor), best, task.monitor_mode):
                best = logs[run.monitor]
                model.save(os.path.join(config.out, BEST))
            model.save(os.path.join(config.out, LAST))
            curves.update()
            if run.reporter is not None:
                run.reporter.update(model, epoch + 1)
        # Every worker decides alike (the budget's clock is agreed across workers): all stop after this epoch.
        stop = budget is not None and budget.after_epoch(epoch + 1)
        run_folder.save_backup(run.backup_dir, model, epoch + 1,  # every worker, each into its own folder
                               budget.state() if budget is not None else None)
        if config.verbose:
            echo(f"epoch {epoch + 1}/{config.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
        if stop:
            break
    if trace is not None:
        trace.close()
    if worker.chief:
        curves.update(final=True)
        if run.reporter is not None:
            run.reporter.update(model, done, final=True)

    digest = hashlib.sha256(b"".join(w.numpy().tobytes() for w in model.weights)).hexdigest()
    record["weights_sha256"] = digest
    run.finish(record, read_history(config.out) if worker.chief else history, echo)
    if worker.chief:
        run_folder.write_run_json(config.out, record)
    echo(f"{worker.type} {worker.index}: weights sha256 {digest}")
    run_folder.remove_backup(run.backup_dir)
    return record
