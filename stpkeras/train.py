"""Train stage: a converted folder -> a run folder, under a `tf.distribute` strategy.

RUN_DIR layout (other stages rely on it):

    run.json      task, model, config, spec, labels, data path, manifest sha256, versions, metrics
    best.keras    the model of the best epoch (by the task's monitor, on validation when there is one)
    last.keras    the model after the last finished epoch
    history.csv   one row per epoch (Keras CSVLogger)
    logs/         TensorBoard
    curves.png    loss and metrics per epoch
    backup/       the state after the last finished epoch while a run is unfinished (`_backup_callback`)

A run killed at any moment and started again with `resume=True` goes on
from the last finished epoch, with its weights, optimizer state and step count,
its layers' random state (dropout) and, with a seed, the rest of its training
data stream: a `deterministic` run killed and resumed ends with the weights of
one that was not killed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import platform
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

from stpkeras import augment as augment_lib
from tfrecords_tools import outputs
from tfrecords_tools.errors import BadInput

STRATEGIES = ("auto", "mirrored", "one", "multiworker")
SCHEDULES = ("cosine", "constant")
RUN_JSON = "run.json"
BEST, LAST, HISTORY, LOGS, CURVES, BACKUP = "best.keras", "last.keras", "history.csv", "logs", "curves.png", "backup"


class RunError(BadInput, RuntimeError):
    """A run folder that cannot be used as asked (exists without --resume, missing files, ...)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; `stp train` builds it from its options."""

    data: str
    out: str
    model: str = "stcnn"
    model_options: Tuple[Tuple[str, object], ...] = ()
    task: str = "classify"
    task_options: Tuple[Tuple[str, object], ...] = ()   # the task's own settings, e.g. enhance's degrade, pixel_loss
    epochs: int = 10
    batch_size: int = 32          # per replica; the global batch is this x replicas
    lr: float = 1e-3              # peak learning rate (AdamW)
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    warmup: float = 0.05          # fraction of all steps over which the learning rate rises linearly from 0
    augment: Tuple[str, ...] = augment_lib.DEFAULT_AUGMENT
    train_split: Optional[str] = None   # None: 'train' when the data has it, else every split
    val_split: Optional[str] = None     # None: 'val' when the data has it; 'none': no validation
    strategy: str = "auto"
    devices: Optional[int] = None       # N logical CPU devices (no GPU) or the first N GPUs
    mixed_precision: bool = False
    jit: bool = False
    seed: Optional[int] = None
    deterministic: bool = False
    resume: bool = False
    class_weight: bool = False
    shuffle_buffer: int = 1024
    verbose: int = 1                    # Keras fit verbosity: 1 progress bar, 2 one line per epoch, 0 quiet
    # Beyond one machine (multiworker.py, data_service.py).
    data_service: Optional[str] = None  # grpc://HOST:PORT of a tf.data service dispatcher
    trace_dir: Optional[str] = None     # write the video id + grid index of every training record seen here

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"Invalid value for argument `{name}`. Expected {expected}. "
                             f"Received {name}={getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "shuffle_buffer"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a strictly positive integer")
        if not self.lr > 0:
            bad("lr", "a strictly positive value")
        if not 0 <= self.warmup < 1:
            bad("warmup", "a fraction of the steps in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "a value >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"one of {STRATEGIES}")
        if self.devices is not None and self.devices < 1:
            bad("devices", "a strictly positive integer")
        if self.verbose not in (0, 1, 2):
            bad("verbose", "0, 1 or 2")
        object.__setattr__(self, "augment", augment_lib.parse_augment(self.augment))
        object.__setattr__(self, "model_options", tuple(sorted(dict(self.model_options).items())))
        object.__setattr__(self, "task_options", tuple(sorted(dict(self.task_options).items())))

    @classmethod
    def tiny(cls, data: str, out: str, **overrides) -> "TrainConfig":
        """A seconds-long run for smoke tests: stcnn, 2 epochs, small batches, no augmentation."""
        settings = dict(model="stcnn", model_options=(("filters", 8),), epochs=2, batch_size=8, augment=(),
                        seed=0, deterministic=True, verbose=0, shuffle_buffer=64)
        settings.update(overrides)
        return cls(data=data, out=out, **settings)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_options"] = dict(self.model_options)
        d["task_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.task_options}
        d["augment"] = list(self.augment)
        return d


# --- devices and strategy -------------------------------------------------------------------------

def configure_devices(devices: Optional[int]) -> None:
    """Makes `devices` devices visible: the first N GPUs, or N logical CPU devices without GPUs.

    Must run before TensorFlow initialises its devices (first op or strategy).
    """
    if devices is None:
        return
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    try:
        if gpus:
            if devices > len(gpus):
                raise RunError(f"--devices {devices}: only {len(gpus)} GPU(s) are visible")
            tf.config.set_visible_devices(gpus[:devices], "GPU")
        else:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(devices)])
    except RuntimeError as e:
        if isinstance(e, RunError):
            raise
        already = len(tf.config.list_logical_devices("GPU" if gpus else "CPU"))
        if already != devices:
            raise RunError(f"--devices {devices}: TensorFlow's devices are already initialised "
                           f"({already} visible); set devices before any TensorFlow op ({e})") from e


def make_strategy(name: str):
    """auto: MirroredStrategy over all GPUs when there are any, else over the logical CPU
    devices when there are several (`--devices`), else one device."""
    import tensorflow as tf
    if name == "multiworker":
        # Reads the cluster from TF_CONFIG, TensorFlow's own convention for multi-worker jobs. Before any
        # other TF call: listing devices initialises the runtime, after which collectives cannot be set up.
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "one" or (name == "auto" and not gpus and len(cpus) < 2):
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
    devices = [d.name for d in gpus] or [d.name for d in cpus]
    # NCCL all-reduce needs GPUs; across CPU devices reduce through one device.
    ops = None if gpus else tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)


# --- the run folder -------------------------------------------------------------------------------

def read_history(run_dir: str) -> Dict[str, List[float]]:
    """history.csv as columns; when a killed run wrote an epoch twice, its last row wins."""
    path = os.path.join(run_dir, HISTORY)
    if not os.path.exists(path):
        return {}
    rows: Dict[int, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("epoch") not in (None, "", "epoch"):
                rows[int(row["epoch"])] = row
    keys = [k for k in (next(iter(rows.values())) if rows else {}) if k != "epoch"]
    epochs = sorted(rows)
    history: Dict[str, List[float]] = {"epoch": [float(e) for e in epochs]}
    for key in keys:
        # CSVLogger writes 'NA' for a key an epoch lacks (every val_ key when there is no validation).
        values = [float(rows[e][key]) if rows[e].get(key) not in (None, "", "NA") else float("nan") for e in epochs]
        if not all(v != v for v in values):
            history[key] = values
    return history


BACKUP_METADATA, BACKUP_WEIGHTS, BACKUP_RANDOM = "training_metadata.json", "latest.weights.h5", "random.npz"


def _backup_metadata(backup_dir: str) -> dict:
    """The backup's `{"epoch": finished epochs, "state": its folder}` ({} when there is no backup)."""
    path = os.path.join(backup_dir, BACKUP_METADATA)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _seed_states(model) -> list:
    """The state variables of the model's Keras `SeedGenerator`s (dropout...), in the model's order.

    `Model.save_weights` leaves them out; without them a resumed run would draw its first epoch's
    dropout masks again.
    """
    return [v for v in model.variables if v.name == "seed_generator_state"]


def _backup_callback(backup_dir: str):
    """Saves the training state after every epoch into `backup_dir`, so that a killed run can go on.

    Each epoch's state goes to its own folder `epoch-NNNNN/` (weights and optimizer state as a Keras
    `.weights.h5`, the layers' seed generator states in `random.npz`), written under a temporary
    name and renamed when complete; then `training_metadata.json` is replaced (atomically) to name
    it, and only then the previous folder is deleted. A kill at any point leaves the metadata naming
    a complete state. The rest of a run's random state needs no saving: the data stream and its
    augmentation seeds are a function of the seed and the position (`_restore_backup`), and the
    learning rate of the optimizer's step count. The folder is removed when training ends.
    (`keras.callbacks.BackupAndRestore` writes the weights in place and the epoch after them, so a
    kill in between left weights of one epoch labelled with the previous one.)
    """
    import keras
    import numpy as np

    class Backup(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            name = f"epoch-{epoch + 1:05d}"
            final, partial = os.path.join(backup_dir, name), os.path.join(backup_dir, name + ".partial")
            for stale in (final, partial):  # left by a run killed while writing this epoch
                shutil.rmtree(stale, ignore_errors=True)
            os.makedirs(partial)
            self.model.save_weights(os.path.join(partial, BACKUP_WEIGHTS))
            np.savez(os.path.join(partial, BACKUP_RANDOM), *[v.numpy() for v in _seed_states(self.model)])
            os.replace(partial, final)
            _write_json(os.path.join(backup_dir, BACKUP_METADATA), {"epoch": epoch + 1, "state": name})
            for entry in os.listdir(backup_dir):
                if entry.startswith("epoch-") and entry != name:
                    shutil.rmtree(os.path.join(backup_dir, entry), ignore_errors=True)

        def on_train_end(self, logs=None):
            shutil.rmtree(backup_dir, ignore_errors=True)

    return Backup()


def _restore_backup(backup_dir: str, model) -> int:
    """Loads the state `_backup_callback` saved last into `model` (compiled, inside the strategy's scope);
    returns the number of finished epochs. A backup of `keras.callbacks.BackupAndRestore` (weights only,
    no `state` folder) loads too."""
    import numpy as np

    metadata = _backup_metadata(backup_dir)
    state = os.path.join(backup_dir, metadata.get("state", ""))
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
    model.load_weights(os.path.join(state, BACKUP_WEIGHTS))
    if os.path.exists(os.path.join(state, BACKUP_RANDOM)):
        with np.load(os.path.join(state, BACKUP_RANDOM)) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        variables = _seed_states(model)
        if len(values) != len(variables):
            raise RunError(f"{state}: {len(values)} seed generator states saved, the model has {len(variables)}. "
                           "Expected the model the backup was written by.")
        for variable, value in zip(variables, values):
            variable.assign(value)
    return int(metadata.get("epoch", 0))


def versions() -> Dict[str, str]:
    import keras
    import numpy
    import tensorflow as tf

    from stpkeras import __version__
    return {"stpkeras": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def load_run(path: str):
    """A run folder (its best.keras, else last.keras) or a `.keras` file -> (keras.Model, run.json or {})."""
    import keras

    # A fresh process (`stp evaluate RUN`) must know every class a run's .keras file names: the custom
    # layers and the segmentation loss (models), enhancement's metrics (quality), the contrastive
    # model's layers and loss (embedding).
    import stpkeras.embedding  # noqa: F401
    import stpkeras.models  # noqa: F401
    import stpkeras.quality  # noqa: F401

    if os.path.isdir(path):
        run_json = os.path.join(path, RUN_JSON)
        info = json.load(open(run_json)) if os.path.exists(run_json) else {}
        for name in (BEST, LAST):
            if os.path.exists(os.path.join(path, name)):
                return keras.models.load_model(os.path.join(path, name)), info
        raise RunError(f"{path}: no {BEST} or {LAST}. Expected a run folder written by `stp train`.")
    if not path.endswith(".keras") or not os.path.exists(path):
        raise RunError(f"{path}: expected a run folder or a .keras file")
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_JSON)
    info = json.load(open(sibling)) if os.path.exists(sibling) else {}
    return keras.models.load_model(path), info


# --- training -------------------------------------------------------------------------------------

def _splits(info, config: TrainConfig) -> Tuple[Tuple[str, ...], Optional[str]]:
    names = info.splits
    val = config.val_split
    if val is None:
        val = "val" if "val" in names else None
    elif val == "none":
        val = None
    elif val not in names:
        raise RunError(f"{config.data}: no split {val!r} for validation. Available: {sorted(names)}")
    train = config.train_split
    if train is None:
        train_splits = ("train",) if "train" in names else tuple(n for n in names if n != val)
    elif train == "all":
        train_splits = tuple(n for n in names if n != val)
    else:
        if train not in names:
            raise RunError(f"{config.data}: no split {train!r} for training. Available: {sorted(names)}")
        train_splits = (train,)
    if not train_splits:
        raise RunError(f"{config.data}: no split left for training (splits {sorted(names)}, validation {val!r})")
    return train_splits, val


def _prepare_run_dir(config: TrainConfig) -> bool:
    """Creates RUN_DIR; returns True when a backup will be resumed."""
    backup = os.path.join(config.out, BACKUP)
    has_backup = os.path.exists(os.path.join(backup, "training_metadata.json"))
    used = [n for n in (RUN_JSON, HISTORY, BEST, LAST, BACKUP) if os.path.exists(os.path.join(config.out, n))]
    if used and not config.resume:
        raise RunError(f"{config.out} already holds a run ({', '.join(used)}). "
                       "Pass --resume to continue it, or choose another --out.")
    if config.resume and not has_backup and os.path.exists(os.path.join(config.out, RUN_JSON)):
        previous = json.load(open(os.path.join(config.out, RUN_JSON)))
        if previous.get("status") == "done":
            raise RunError(f"{config.out}: the run finished ({previous.get('metrics', {}).get('epochs')} epochs); "
                           "nothing to resume.")
    os.makedirs(config.out, exist_ok=True)
    return has_backup


def _curves_callback(run_dir: str):
    """Redraws curves.png from history.csv after every epoch, so a killed run still has it."""
    import keras

    from stpkeras.figures import draw_curves

    class Curves(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            history = read_history(run_dir)
            if history.get("epoch"):
                draw_curves(history, os.path.join(run_dir, CURVES))

    return Curves()


def learning_rate(config: TrainConfig, total_steps: int):
    """The peak `config.lr`, reached after a linear warmup over `config.warmup` of the steps, then cosine
    decay to 1% of it (or held, for the constant schedule). Without warmup, Adam's first steps move every
    weight by about lr whatever its gradient: measured on the denoising benchmark, a zero-initialised
    dncnn3d then never left the identity (its ReLUs silenced), and learnt with 5% warmup."""
    import keras

    warmup = int(round(config.warmup * total_steps))
    alpha = 0.01 if config.schedule == "cosine" else 1.0  # alpha 1: no decay
    if not warmup and config.schedule != "cosine":
        return config.lr
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else config.lr, decay_steps=max(total_steps - warmup, 1), alpha=alpha,
        warmup_target=config.lr if warmup else None, warmup_steps=warmup)


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
        return _train(config, echo)


def _train(config: TrainConfig, echo: Callable[[str], None]) -> dict:
    configure_devices(config.devices)
    if config.strategy == "multiworker":
        # Keras 3's fit cannot run under MultiWorkerMirroredStrategy (see multiworker.py).
        from stpkeras.multiworker import train_multiworker
        return train_multiworker(config, echo)

    import keras
    import tensorflow as tf

    from stpkeras import pipeline
    from stpkeras.tasks import get_task

    started = time.time()
    info = pipeline.load_info(config.data)
    task = get_task(config.task, dict(config.task_options)).for_data(info)
    try:
        # The task's classes: the data's labels for classify, mask or frame classes for segment, none for embed.
        labels = tuple(task.class_names(info))
    except ValueError as e:
        raise RunError(f"{config.data}: {e}") from e
    if task.needs_labels and len(labels) < 2:
        raise RunError(f"{config.data}: task {task.name!r} needs labelled data with >= 2 classes; "
                       f"the manifest lists {list(labels)}")
    train_splits, val_split = _splits(info, config)
    resuming = _prepare_run_dir(config)
    backup_dir = os.path.join(config.out, BACKUP)

    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        # Same ops, same order, same bits: tf.data and the kernels both run deterministically.
        tf.config.experimental.enable_op_determinism()
    strategy = make_strategy(config.strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    train_records = info.num_records(train_splits)
    steps = train_records // global_batch
    if steps < 1:
        raise RunError(f"{config.data}: {train_records} training patches make no full batch of {global_batch} "
                       f"({config.batch_size} per replica x {replicas}); lower --batch-size")

    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        # float16 with loss scaling on GPUs (compile() wraps the optimizer); bfloat16 where there is none.
        gpu = bool(tf.config.list_logical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    try:
        with strategy.scope():
            model = task.build_model(config.model, info.spec, labels, dict(config.model_options))
            lr = learning_rate(config, config.epochs * steps)
            model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=config.weight_decay),
                          loss=task.loss(), metrics=task.metrics(labels), jit_compile=config.jit)
            initial_epoch = _restore_backup(backup_dir, model) if resuming else 0

        common = dict(batch_size=config.batch_size, strategy=strategy, seed=config.seed,
                      deterministic=config.deterministic)
        # A task with its own element (views, masks) applies the augmentation itself.
        train_element = task.element_fn(info, config.augment, training=True)
        val_element = task.element_fn(info, config.augment, training=False)
        # One iterator for the whole run: the dataset repeats and `fit` counts `steps` batches an epoch.
        # A dataset that ends each epoch makes Keras build a new iterator every epoch, and on 2 cores
        # some of those iterators left the training ops on one core: epochs of the enhancement benchmark
        # took 45 s or 82 s at random (same CPU time), against 45 s every epoch with one iterator.
        # A resumed run goes on with the batches the killed one had not reached: with a seed, the stream is
        # the same on every run, so skipping the batches of the finished epochs continues it exactly.
        # (Checkpointing the iterator instead is not open to us: `fit` makes its own, distributed, iterator,
        # and `tf.distribute`'s iterators cannot be checkpointed.)
        skip = initial_epoch * steps if config.seed is not None else 0
        train_ds = pipeline.make_dataset(info, train_splits, training=True, element_fn=train_element,
                                         augment=None if train_element is not None else config.augment,
                                         shuffle_buffer=config.shuffle_buffer, repeat=True, skip_batches=skip,
                                         **common)
        val_ds = (pipeline.make_dataset(info, val_split, training=False, element_fn=val_element, **common)
                  if val_split else None)
        if config.data_service:
            # Decoding and augmentation run on the tf.data service's workers (see data_service.py).
            if getattr(task, "element_fn", lambda *a, **k: None)(info, config.augment, training=True) is not None:
                raise RunError(f"--data-service: task {task.name!r} brings its own element; only (patch, label) "
                               "tasks are served so far")
            from stpkeras.data_service import make_service_dataset
            if config.trace_dir:
                os.makedirs(config.trace_dir, exist_ok=True)
            trace_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)
            train_ds = make_service_dataset(
                info, train_splits, config.data_service, batch_size=global_batch, augment=config.augment,
                shuffle_buffer=config.shuffle_buffer, seed=config.seed, trace_epoch=trace_epoch,
                trace_file=os.path.join(config.trace_dir, "trainer.txt") if config.trace_dir else None)

        monitor = ("val_" if val_ds is not None else "") + task.monitor
        best_so_far = _best_value(read_history(config.out), monitor, task.monitor_mode, initial_epoch)
        run = {"task": task.name, "model": config.model, "config": config.to_dict(),
               "spec": info.spec.to_dict(), "labels": list(labels), "data": config.data,
               "manifest_sha256": info.sha256(), "versions": versions(),
               "splits": {"train": list(train_splits), "val": val_split},
               "strategy": {"name": type(strategy).__name__, "replicas": replicas, "global_batch": global_batch,
                            "devices": [d for d in strategy.extended.worker_devices]},
               "steps_per_epoch": steps, "params": int(model.count_params()), "status": "running",
               "metrics": {}}
        _write_json(os.path.join(config.out, RUN_JSON), run)
        echo(f"{config.model}: {run['params']:,} parameters; {type(strategy).__name__} over {replicas} "
             f"replica(s), global batch {global_batch}; {train_records} training patches "
             f"({', '.join(train_splits)}), {steps} steps/epoch"
             + (f"; validation on {val_split!r}" if val_split else "; no validation split")
             + (f"; resuming at epoch {initial_epoch + 1}" if resuming else ""))

        callbacks = [
            # CSV first and the backup last: when the backup says an epoch is done,
            # its row, checkpoints and curves are written too.
            keras.callbacks.CSVLogger(os.path.join(config.out, HISTORY), append=True),
            keras.callbacks.ModelCheckpoint(os.path.join(config.out, BEST), monitor=monitor,
                                            mode=task.monitor_mode, save_best_only=True,
                                            initial_value_threshold=best_so_far),
            keras.callbacks.ModelCheckpoint(os.path.join(config.out, LAST)),
            keras.callbacks.TensorBoard(os.path.join(config.out, LOGS)),
            _curves_callback(config.out),
            _backup_callback(backup_dir),
        ]
        if config.data_service:
            from stpkeras.data_service import stall_warning_callback, trace_epoch_callback
            # A dead worker stalls the epoch until it is restarted: say so rather than hang in silence.
            callbacks.append(stall_warning_callback(config.data_service, echo=echo))
            if config.trace_dir:
                callbacks.append(trace_epoch_callback(trace_epoch))
        class_weight = (task.class_weight(_counts(info, train_splits), labels) if config.class_weight else None)
        # shuffle=False: the pipeline already shuffles (files, then records); Keras cannot shuffle a Dataset.
        # A tf.data service dataset ends its epochs itself (each record once per epoch).
        steps_per_epoch = None if config.data_service else steps
        model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                  initial_epoch=initial_epoch, callbacks=callbacks, class_weight=class_weight, verbose=config.verbose, shuffle=False)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    history = read_history(config.out)
    run["metrics"] = _summary(history, monitor, task.monitor_mode)
    run["metrics"]["optimizer_steps"] = int(model.optimizer.iterations.numpy())
    run["status"] = "done"
    run["seconds"] = round(time.time() - started, 2)
    _write_json(os.path.join(config.out, RUN_JSON), run)
    return run


def _counts(info, splits) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for split in splits:
        for name, n in info.manifest["splits"][split].get("label_counts", {}).items():
            counts[name] = counts.get(name, 0) + int(n)
    return counts


def _best_value(history: Dict[str, List[float]], monitor: str, mode: str, before_epoch: int) -> Optional[float]:
    values = [v for e, v in zip(history.get("epoch", []), history.get(monitor, [])) if e < before_epoch]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def _summary(history: Dict[str, List[float]], monitor: str, mode: str) -> dict:
    if not history.get("epoch"):
        return {"epochs": 0}
    last = {k: v[-1] for k, v in history.items() if k != "epoch"}
    values = history.get(monitor, [])
    best = (max if mode == "max" else min)(range(len(values)), key=values.__getitem__) if values else None
    return {"epochs": len(history["epoch"]), "final": last, "monitor": monitor,
            "best_epoch": int(history["epoch"][best]) + 1 if best is not None else None,
            "best": {k: v[best] for k, v in history.items() if k != "epoch"} if best is not None else {}}
