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

Every worker runs this same code. Only the chief (task `chief`, else
`worker` 0) writes the run folder (run.json, history.csv, best/last.keras,
curves.png); every worker keeps its own backup in `RUN_DIR/backup/TYPE-INDEX`
(a `tf.train.CheckpointManager` saved at the end of each epoch by all
workers, as collective saving requires), so a restarted cluster goes on
from the last epoch every worker finished.

Data: each worker runs its own copy of `make_dataset`; `tf.distribute`
shards it by file (or by record when there are fewer files than workers,
see `pipeline.shard_policy`), so each record is read by one worker. An
epoch is `records // global batch` steps on every worker; when the batch
divides the records and the shards are even (or sharding is by record),
every record is seen exactly once per epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional

from stpkeras import train as train_lib
from tfrecords_tools import schema


def worker_identity(strategy) -> tuple:
    """(task type, task index, is chief) of this process, from the strategy's TF_CONFIG resolver."""
    resolver = strategy.cluster_resolver
    jobs = resolver.cluster_spec().jobs
    task_type, index = resolver.task_type, int(resolver.task_id or 0)
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in jobs)
    return task_type, index, chief


def shared_seed(strategy, data_sha: str) -> int:
    """A seed every worker computes alike without talking: record-level (DATA) sharding needs the same
    shuffle order everywhere, or workers would keep overlapping records."""
    cluster = json.dumps(strategy.cluster_resolver.cluster_spec().as_dict(), sort_keys=True)
    return int(hashlib.sha256((cluster + data_sha).encode()).hexdigest()[:7], 16)


def train_multiworker(config, echo: Callable[[str], None] = print) -> dict:
    """`stpkeras.train.train` for `strategy='multiworker'`; returns run.json's content (on every worker)."""
    import keras
    import tensorflow as tf

    from stpkeras import pipeline
    from stpkeras.tasks import get_task

    started = time.time()
    strategy = train_lib.make_strategy("multiworker")
    task_type, index, chief = worker_identity(strategy)
    info = pipeline.load_info(config.data)
    task = get_task(config.task)
    task = task.for_data(info) if hasattr(task, "for_data") else task
    labels = tuple(task.class_names(info)) if hasattr(task, "class_names") else info.labels
    train_splits, val_split = train_lib._splits(info, config)
    backup_dir = os.path.join(config.out, train_lib.BACKUP, f"{task_type}-{index}")
    # Each worker checks only what it owns: the others' backup folders appear at their own pace.
    owned = [os.path.join(config.out, n) for n in
             ((train_lib.RUN_JSON, train_lib.HISTORY, train_lib.BEST, train_lib.LAST) if chief else ())]
    used = [p for p in owned if os.path.exists(p)] + ([backup_dir] if tf.train.latest_checkpoint(backup_dir) else [])
    if used and not config.resume:
        raise train_lib.RunError(f"{config.out} already holds a run ({', '.join(map(os.path.basename, used))}). "
                                 "Pass --resume (on every worker) to continue it, or choose another --out.")
    os.makedirs(backup_dir, exist_ok=True)

    seed = config.seed if config.seed is not None else shared_seed(strategy, info.sha256())
    keras.utils.set_random_seed(seed)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    steps = info.num_records(train_splits) // global_batch
    if steps < 1:
        raise train_lib.RunError(f"{config.data}: no full batch of {global_batch} for training; lower --batch-size")

    element_fn = task.element_fn(info, config.augment, training=True) if hasattr(task, "element_fn") else None
    workers = pipeline.num_workers(strategy)
    by_record = pipeline.shard_policy(len(info.files(train_splits)), workers) != tf.data.experimental.AutoShardPolicy.FILE
    # Record-level sharding keeps every N-th element of each worker's full copy of the stream: the
    # copies must be in the same order everywhere, so the parallel stages may not reorder.
    common = dict(batch_size=config.batch_size, strategy=strategy, seed=seed,
                  deterministic=config.deterministic or by_record)
    # Without a task element the records come as dicts, so the video id and grid index of every
    # patch a worker trains on can be traced (`trace_dir`); the step uses only patch and label.
    # Repeated, with a fixed number of steps per epoch on every worker (what fit's steps_per_epoch
    # does): shards of unequal size must not leave one worker with an empty batch while the others
    # still step; TF 2.21's oneDNN MaxPoolGrad aborts the process on one ("Check failed: dtype()").
    train_ds = pipeline.make_dataset(info, train_splits, training=True, repeat=True,
                                     shuffle_buffer=config.shuffle_buffer,
                                     augment=None if element_fn is not None else config.augment,
                                     as_supervised=element_fn is not None,
                                     **({"element_fn": element_fn} if element_fn is not None else {}), **common)
    val_ds = None
    if val_split:
        val_element = task.element_fn(info, config.augment, training=False) if hasattr(task, "element_fn") else None
        val_steps = info.num_records(val_split) // global_batch
        if val_steps:
            val_ds = pipeline.make_dataset(info, val_split, training=False, repeat=True, drop_remainder=True,
                                           **({"element_fn": val_element} if val_element is not None else {}),
                                           **common)
    train_batches = iter(strategy.experimental_distribute_dataset(train_ds))
    val_batches = iter(strategy.experimental_distribute_dataset(val_ds)) if val_ds is not None else None

    with strategy.scope():
        model = task.build_model(config.model, info.spec, labels, dict(config.model_options))
        lr = (keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=config.epochs * steps, alpha=0.01)
              if config.schedule == "cosine" else config.lr)
        optimizer = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
        loss_fn = task.loss()
        train_metrics = task.metrics(labels)
        val_metrics = task.metrics(labels)
        loss_mean, val_loss_mean = keras.metrics.Mean(name="loss"), keras.metrics.Mean(name="val_loss")
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, backup_dir, max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
    first_epoch = int(epoch_var.numpy())

    def split(element):
        if isinstance(element, dict):
            return element[schema.PATCH], element[schema.LABEL], (element[schema.VIDEO_ID], element[schema.INDEX])
        return element[0], element[1], None

    def replica_step(element):
        x, y, ids = split(element)
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            # A Keras 3 loss called in a replica context already divides its batch mean by the number
            # of replicas (keras.losses.Loss -> scale_loss_for_distribution), so the all-reduced (summed)
            # gradient is that of the mean over the global batch; the model's own losses get the same.
            scaled = loss_fn(y, pred)
            if model.losses:
                scaled += tf.add_n(model.losses) / replicas
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        loss_mean.update_state(scaled * replicas)
        for m in train_metrics:
            m.update_state(y, pred)
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

    monitor = ("val_" if val_ds is not None else "") + task.monitor
    history_path = os.path.join(config.out, train_lib.HISTORY)
    best = train_lib._best_value(train_lib.read_history(config.out), monitor, task.monitor_mode, first_epoch) if chief else None
    trace = None
    if config.trace_dir:
        os.makedirs(config.trace_dir, exist_ok=True)
        trace = open(os.path.join(config.trace_dir, f"{task_type}-{index}.jsonl"), "a")
    run = {"task": task.name, "model": config.model, "config": config.to_dict(), "spec": info.spec.to_dict(),
           "labels": list(labels), "data": config.data, "manifest_sha256": info.sha256(),
           "versions": train_lib.versions(), "splits": {"train": list(train_splits), "val": val_split},
           "strategy": {"name": type(strategy).__name__, "replicas": replicas, "global_batch": global_batch,
                        "workers": pipeline.num_workers(strategy), "loop": "custom (multiworker.py)"},
           "steps_per_epoch": steps, "params": int(model.count_params()), "status": "running", "metrics": {},
           "seed": seed}
    if chief:
        train_lib._write_json(os.path.join(config.out, train_lib.RUN_JSON), run)
    echo(f"{task_type} {index}{' (chief)' if chief else ''}: {type(strategy).__name__}, {replicas} replicas, "
         f"global batch {global_batch}, ~{steps} steps/epoch" + (f"; resuming at epoch {first_epoch + 1}" if first_epoch else ""))

    history: Dict[str, List[float]] = {"epoch": []}  # this session's epochs, for a worker without history.csv
    for epoch in range(first_epoch, config.epochs):
        for m in [loss_mean, val_loss_mean] + train_metrics + val_metrics:
            m.reset_state()
        for _ in range(steps):
            ids = train_step(next(train_batches))
            if trace is not None:
                for local in strategy.experimental_local_results(ids):
                    if isinstance(local, tuple):
                        video_ids, grid = local
                        trace.write(json.dumps({"epoch": epoch, "records": [
                            [v.decode(), *map(int, g)] for v, g in zip(video_ids.numpy(), grid.numpy())]}) + "\n")
        if val_batches is not None:
            for _ in range(val_steps):
                eval_step(next(val_batches))
        logs = {"loss": float(loss_mean.result())}
        logs.update({m.name: float(m.result()) for m in train_metrics})
        if val_batches is not None:
            logs["val_loss"] = float(val_loss_mean.result())
            logs.update({"val_" + m.name: float(m.result()) for m in val_metrics})
        history["epoch"].append(float(epoch))
        for k, v in logs.items():
            history.setdefault(k, []).append(v)
        epoch_var.assign(epoch + 1)
        manager.save()  # every worker, each into its own folder
        if trace is not None:
            trace.flush()
        if chief:
            _append_history(history_path, epoch, logs)
            model.save(os.path.join(config.out, train_lib.LAST))
            value = logs.get(monitor)
            if value is not None and (best is None or (value > best if task.monitor_mode == "max" else value < best)):
                best = value
                model.save(os.path.join(config.out, train_lib.BEST))
        if config.verbose:
            echo(f"epoch {epoch + 1}/{config.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
    if trace is not None:
        trace.close()

    weights = [w.numpy() for w in model.weights]
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
    run["weights_sha256"] = digest
    run["metrics"] = train_lib._summary(train_lib.read_history(config.out) if chief else history, monitor,
                                        task.monitor_mode)
    run["metrics"]["optimizer_steps"] = int(optimizer.iterations.numpy())
    run["status"] = "done"
    run["seconds"] = round(time.time() - started, 2)
    if chief:
        train_lib._write_json(os.path.join(config.out, train_lib.RUN_JSON), run)
    echo(f"{task_type} {index}: weights sha256 {digest}")
    # As BackupAndRestore does at the end of training: the backup only serves an unfinished run.
    import shutil
    shutil.rmtree(backup_dir, ignore_errors=True)
    return run


def _append_history(path: str, epoch: int, logs: Dict[str, float]) -> None:
    """One row per epoch, in the columns CSVLogger writes (epoch first, then the keys sorted)."""
    keys = sorted(logs)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["epoch"] + keys)
        writer.writerow([epoch] + [logs[k] for k in keys])
