"""Training set-up stage: a `TrainConfig` -> a `Run`, everything a training loop needs, prepared once.

`prepare_run` reads the data's manifest, specialises the task (with its options) for the data, picks the
splits and the strategy, checks the run folder, builds and compiles the model (AdamW on the warmup +
cosine schedule, the task's loss and metrics, mixed precision, XLA), restores an unfinished run's backup
and makes the datasets. The two loops only step: Keras `fit` (`stpkeras.train`) and the custom loop under
`MultiWorkerMirroredStrategy` (`stpkeras.multiworker`). An option one of them cannot honour is refused
here, or by `TrainConfig` itself, before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from stpkeras import augment as augment_lib
from stpkeras import run_folder
from stpkeras.artifacts import BACKUP, BEST, HISTORY, LAST, RUN_JSON, read_history
from stpkeras.run_folder import RunError

STRATEGIES = ("auto", "mirrored", "one", "multiworker")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; `stp train` builds it from its options.

    `model`, `augment`, `batch_size` and `lr` left None are the task's defaults (`stpkeras.tasks`:
    dncnn3d, flip, batch 8 and lr 2e-3 for enhance, unet3d for segment, stcnn, 32 and 1e-3 otherwise);
    `task_options` are completed with the task's defaults. A short `minutes` budget on CPUs alone may give
    the task's default model other defaults (`_cpu_budget_recipe`; `recipe` then says which and why).
    The config holds the resolved values, and run.json records them.
    """

    data: str
    out: str
    model: Optional[str] = None
    model_options: Tuple[Tuple[str, object], ...] = ()
    task: str = "classify"
    task_options: Tuple[Tuple[str, object], ...] = ()   # the task's own settings, e.g. enhance's degrade, pixel_loss
    epochs: int = 10              # with `minutes`: the most epochs (`stpkeras.budget`)
    minutes: Optional[float] = None   # a training time budget: stop at the last epoch boundary within it
    steps_per_epoch: Optional[int] = None   # None: the training records // the global batch
    batch_size: Optional[int] = None   # per replica; the global batch is this x replicas (None: the task's)
    lr: Optional[float] = None         # peak learning rate (AdamW; None: the task's)
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    warmup: float = 0.05          # fraction of all steps over which the learning rate rises linearly from 0
    augment: Optional[Tuple[str, ...]] = None
    train_split: Optional[str] = None   # None: 'train' when the data has it, else every split
    val_split: Optional[str] = None     # None: 'val' when the data has it; 'none': no validation
    strategy: str = "auto"
    devices: Optional[int] = None       # N logical CPU devices (no GPU) or the first N GPUs
    # None: bfloat16 compute on a CPU that computes it natively (AMX, AVX-512 BF16) when no GPU is visible, for
    # the tasks that measured it (`Task.AUTO_BFLOAT16`: enhance), float32 elsewhere (`mixed_policy`); True:
    # float16 on GPUs, bfloat16 on CPUs; False: float32.
    mixed_precision: Optional[bool] = None
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
    # Fine-tuning (stpkeras.finetune): the backbone from an earlier run, frozen or at a lower learning rate.
    init_from: Optional[str] = None     # a run folder or .keras file
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0
    layer_decay: Optional[float] = None  # ViTs: the learning rate x this per block below the head
    # Set by the config, not passed: the task's short-CPU-budget recipe when it applied (`_cpu_budget_recipe`).
    recipe: Optional[str] = dataclasses.field(default=None, init=False)
    # Set by the config, not passed: `lr` is a default (the task's or the recipe's), which the data may scale
    # (`Task.lr_scale`, applied by `prepare_run`); False: the user's, kept as given.
    lr_default: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        from stpkeras.tasks import get_task

        def bad(name, expected):
            raise ValueError(f"Invalid value for argument `{name}`. Expected {expected}. "
                             f"Received {name}={getattr(self, name)!r}")
        task_class = type(get_task(self.task, {}))
        recipe, recipe_batch = _cpu_budget_recipe(self, task_class)
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "lr_default", self.lr is None)
        if self.recipe is not None:
            object.__setattr__(self, "model_options", task_class.CPU_BUDGET_OPTIONS)
            object.__setattr__(self, "task_options", (*_unset(task_class.CPU_BUDGET_TASK_OPTIONS, self.task_options),
                                                      *self.task_options))
            object.__setattr__(self, "lr", task_class.CPU_BUDGET_LR)
            if recipe_batch is not None:
                object.__setattr__(self, "batch_size", recipe_batch)
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", task_class.DEFAULT_BATCH_SIZE)
        if self.lr is None:
            object.__setattr__(self, "lr", task_class.DEFAULT_LR)
        for name in ("epochs", "batch_size", "shuffle_buffer"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a strictly positive integer")
        if not self.lr > 0:
            bad("lr", "a strictly positive value")
        if self.minutes is not None and not self.minutes > 0:
            bad("minutes", "a strictly positive number of minutes, or None")
        if self.steps_per_epoch is not None and (not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 1):
            bad("steps_per_epoch", "a strictly positive integer, or None")
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
        # What the custom loop cannot do is refused here, not skipped in silence.
        if self.data_service and self.strategy == "multiworker":
            bad("data_service", "None with strategy='multiworker' (the custom loop reads its own shard of the "
                                "records; a tf.data service feeds Keras fit only)")
        if self.steps_per_epoch is not None and self.data_service:
            bad("steps_per_epoch", "None with data_service (a tf.data service ends its epochs itself: each record "
                                   "once per epoch)")
        if self.minutes is not None and self.data_service:
            bad("minutes", "None with data_service (its epochs end with the data, not at a step count the "
                           "budget's schedule can plan)")
        if self.trace_dir and not (self.data_service or self.strategy == "multiworker"):
            bad("trace_dir", "None unless strategy='multiworker' or a data_service is set (only those loops "
                             "trace the records they receive)")
        if not self.backbone_lr_scale > 0:
            bad("backbone_lr_scale", "a strictly positive factor")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            bad("layer_decay", "a factor in (0, 1]")
        tuned = [n for n, v in (("freeze_backbone", self.freeze_backbone), ("backbone_lr_scale",
                 self.backbone_lr_scale != 1.0), ("layer_decay", self.layer_decay is not None)) if v]
        if tuned and not self.init_from:
            bad(tuned[0], "its default without init_from (there is no backbone to treat apart)")
        if self.freeze_backbone and len(tuned) > 1:
            bad(tuned[1], "its default with freeze_backbone (a frozen backbone has no learning rate)")
        task = get_task(self.task, dict(self.task_options))  # an unknown task or option fails here
        object.__setattr__(self, "model", task.default_model if self.model is None else self.model)
        object.__setattr__(self, "augment", task.default_augment if self.augment is None
                           else augment_lib.parse_augment(self.augment))
        object.__setattr__(self, "model_options", tuple(sorted(dict(self.model_options).items())))
        object.__setattr__(self, "task_options", tuple(sorted(task.options().items())))

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


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU (physical devices: does not initialise the runtime's devices)."""
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


BFLOAT16_FEATURES = ("amx_bf16", "avx512_bf16")


def native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU feature by which this machine computes bfloat16 natively (`amx_bf16`, then `avx512_bf16`), or
    None: none of them, or a system without /proc/cpuinfo. oneDNN runs bfloat16 convolutions on them; on an
    AMX CPU a dncnn3d training step took 0.26x the CPU of float32 (docs/benchmarks.md, CPU kernels)."""
    try:
        with open(cpuinfo) as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return None
    return next((feature for feature in BFLOAT16_FEATURES if feature in flags), None)


def mixed_policy(mixed_precision: Optional[bool], gpu: bool, auto: bool = True) -> Optional[str]:
    """The Keras mixed-precision policy a run trains under, or None for float32. Asked for (True):
    `mixed_float16` on GPUs (the loss scaled), `mixed_bfloat16` on CPUs. Not said (None): `mixed_bfloat16`
    where `auto` (the task's `AUTO_BFLOAT16`) on a CPU that computes it natively (`native_bfloat16`) when there
    is no GPU, float32 elsewhere. Loaded models compute in float32 (`artifacts.float32_model`)."""
    if mixed_precision is None:
        return "mixed_bfloat16" if auto and not gpu and native_bfloat16() else None
    if mixed_precision:
        return "mixed_float16" if gpu else "mixed_bfloat16"
    return None


def scale_default_lr(config: TrainConfig, task) -> TrainConfig:
    """`config` with its default learning rate x the data's `task.lr_scale()` (`recipe` then says so); an lr
    the user gave, or a scale of 1, leaves it as it is."""
    scale, why = task.lr_scale()
    if not config.lr_default or scale == 1.0:
        return config
    scaled = copy.copy(config)   # frozen: the resolved config, one value changed (no second resolution)
    object.__setattr__(scaled, "lr", config.lr * scale)
    note = f"lr {config.lr:g} x {scale:g} = {scaled.lr:g} on {why} (--lr chooses otherwise)"
    object.__setattr__(scaled, "recipe", f"{config.recipe}; {note}" if config.recipe else note)
    return scaled


def _cpu_budget_recipe(config: TrainConfig, task_class) -> Tuple[Optional[str], Optional[int]]:
    """The line that says the task's CPU-budget defaults apply to `config` (None when they do not), and the batch
    size they set (None: the task's or the user's).

    They apply to a timed run (`minutes`) of the task's default model with nothing of the model's set (no
    model, model options, lr or init_from), when the budget is at most the task's `CPU_BUDGET_CORE_MINUTES`
    (minutes x CPU cores) and no GPU is visible. Not under multiworker: there no device may be listed before
    the strategy exists. The batch is the task's `CPU_BUDGET_FLOAT32_BATCH_SIZE` when the user gave none and the
    run trains in float32 (`mixed_policy`, without a GPU as the recipe is).
    """
    if (not task_class.CPU_BUDGET_CORE_MINUTES or config.minutes is None or config.model is not None
            or config.model_options or config.lr is not None or config.init_from or config.strategy == "multiworker"):
        return None, None
    cores = cpu_cores()
    if config.minutes * cores > task_class.CPU_BUDGET_CORE_MINUTES or has_gpu():
        return None, None
    options = ", ".join(f"{k}={v}" for k, v in (*task_class.CPU_BUDGET_OPTIONS,
                                                 *_unset(task_class.CPU_BUDGET_TASK_OPTIONS, config.task_options)))
    batch = None
    if (config.batch_size is None and task_class.CPU_BUDGET_FLOAT32_BATCH_SIZE
            and mixed_policy(config.mixed_precision, gpu=False, auto=task_class.AUTO_BFLOAT16) is None):
        batch = task_class.CPU_BUDGET_FLOAT32_BATCH_SIZE
        options += f"{', ' if options else ''}batch size {batch} in float32"
    return (f"CPU-budget defaults: {options + ', ' if options else ''}lr {task_class.CPU_BUDGET_LR:g} (no GPU, "
            f"{config.minutes:g} min x "
            f"{cores} cores <= {task_class.CPU_BUDGET_CORE_MINUTES:g} core-minutes; --model-arg, --lr or the "
            "task's options choose otherwise)"), batch


def _unset(defaults, given) -> tuple:
    """The (key, value) pairs of `defaults` whose key `given` does not set."""
    return tuple((k, v) for k, v in defaults if k not in dict(given))


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


class Worker(NamedTuple):
    """This process in its cluster: ("", 0, chief) on one machine."""

    type: str
    index: int
    chief: bool


def worker_identity(strategy) -> Worker:
    """This process's task type and index, and whether it is the chief (task `chief`, else `worker` 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return Worker("", 0, True)
    jobs = resolver.cluster_spec().jobs
    task_type, index = resolver.task_type, int(resolver.task_id or 0)
    chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in jobs)
    return Worker(task_type, index, chief)


def shared_seed(strategy, data_sha: str) -> int:
    """A seed every worker computes alike without talking: record-level (DATA) sharding needs the same
    shuffle order everywhere, or workers would keep overlapping records."""
    cluster = json.dumps(strategy.cluster_resolver.cluster_spec().as_dict(), sort_keys=True)
    return int(hashlib.sha256((cluster + data_sha).encode()).hexdigest()[:7], 16)


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


# --- the data -------------------------------------------------------------------------------------

def choose_splits(info, config: TrainConfig) -> Tuple[Tuple[str, ...], Optional[str]]:
    """(training splits, validation split or None) from `config.train_split` / `val_split` and the data's splits."""
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


def label_counts(info, splits) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for split in splits:
        for name, n in info.manifest["splits"][split].get("label_counts", {}).items():
            counts[name] = counts.get(name, 0) + int(n)
    return counts


# --- the run --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
    """What a loop steps through: made by `prepare_run`, read by `train.fit` and `multiworker.train_custom`."""

    config: TrainConfig
    info: object                  # pipeline.DataInfo
    task: object                  # tasks.Task, specialised for the data (`for_data`), with its options
    labels: Tuple[str, ...]       # the classes the model predicts, or regress's values (run.json's `labels`)
    train_splits: Tuple[str, ...]
    val_split: Optional[str]
    strategy: object
    worker: Worker
    seed: Optional[int]           # config.seed; under multiworker one every worker shares when unset
    steps: int                    # training steps per epoch
    val_steps: Optional[int]      # None: the whole validation split each epoch; else that many full batches
    train_ds: object              # tf.data.Dataset of global batches, repeated (a tf.data service's ends its epochs)
    val_ds: object                # tf.data.Dataset or None
    model: object                 # keras.Model compiled with its optimizer, loss, metrics and jit setting
    initial_epoch: int            # finished epochs restored from the backup
    class_weight: Optional[Dict[int, float]]
    backup_dir: str
    trace_epoch: object           # tf.Variable of the epoch a tf.data service's trace is at, or None
    started: float                # time.time() at the start of prepare_run
    transfer: object = None       # finetune.Transfer: what --init-from took, or None
    reporter: object = None       # the task's figure (Task.reporter), drawn by the chief, or None
    budget: object = None         # budget.Budget of a timed run (`config.minutes`), or None

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.replicas

    @property
    def monitor(self) -> str:
        """The metric that picks best.keras: the task's, on validation when there is any."""
        return ("val_" if self.val_ds is not None else "") + self.task.monitor

    def best_so_far(self) -> Optional[float]:
        """The monitor's best value of the epochs a resumed run has already finished."""
        return run_folder.best_value(read_history(self.config.out), self.monitor, self.task.monitor_mode,
                                     self.initial_epoch)

    def record(self, loop: str) -> dict:
        """run.json at the start, both loops alike but for `strategy.loop`."""
        from stpkeras import pipeline

        config, info = self.config, self.info
        return {"task": self.task.name, "task_options": self.task.recorded(), "model": config.model,
                "config": config.to_dict(),
                "spec": info.spec.to_dict(), "labels": list(self.labels), "data": config.data,
                "manifest_sha256": info.sha256(), "versions": run_folder.versions(),
                "splits": {"train": list(self.train_splits), "val": self.val_split},
                "strategy": {"name": type(self.strategy).__name__, "replicas": self.replicas,
                             "global_batch": self.global_batch, "workers": pipeline.num_workers(self.strategy),
                             "devices": list(self.strategy.extended.worker_devices), "loop": loop},
                "seed": self.seed, "steps_per_epoch": self.steps, "params": int(self.model.count_params()),
                "precision": self.model.dtype_policy.name,
                "budget": {"minutes": config.minutes} if config.minutes is not None else None,
                "init_from": self.transfer.to_dict() if self.transfer is not None else None,
                "status": "running", "metrics": {}}

    def finish(self, record: dict, history, echo: Callable[[str], None] = print) -> dict:
        """run.json at the end, both loops alike: the metrics of `history` (history.csv's rows, or a worker's
        own), the optimizer's steps, the budget, the task's end-of-run choices (`tune_files`) and check of the
        trained model (`Task.check_model`), both on the chief (the check's warning echoed), and the status."""
        task = self.task
        record["metrics"] = run_folder.summarize(history, self.monitor, task.monitor_mode)
        record["metrics"]["optimizer_steps"] = int(self.model.optimizer.iterations.numpy())
        if self.budget is not None:
            record["budget"] = self.budget.record()
        if self.worker.chief:
            tuned = self.tune_files(echo)
            if tuned is not None:
                record["tuned"] = tuned
            check = task.check_model(self.model, self.info, self.val_split or list(self.train_splits))
            if check is not None:
                record["check"] = check
                if check.get("warning"):
                    echo(f"warning: {check['warning']}")
        record["status"] = "done"
        record["seconds"] = round(time.time() - self.started, 2)
        return record

    def tune_files(self, echo: Callable[[str], None] = print) -> Optional[dict]:
        """The task's end-of-run choices (`Task.tune_model`, e.g. an enhancer's deblocking threshold) for the
        run's model files: made on the model as it predicts (float32), set in the model in memory and written
        into last.keras and best.keras (each its own choice; atomically, so a kill leaves the file as it was);
        run.json's `tuned`, by file. None when the task has nothing to choose (`Task.tunes`; no file is touched)."""
        import keras
        import numpy as np

        from stpkeras.artifacts import float32_model
        from tfrecords_tools import outputs

        if not self.task.tunes(self.model):
            return None
        split = self.val_split or list(self.train_splits)
        inference = float32_model(self.model)
        choice = self.task.tune_model(inference, self.info, split)
        if choice is None:   # no patches to choose on
            return None
        if inference is not self.model:
            self.model.set_weights(inference.get_weights())
        tuned = {}
        for name in (LAST, BEST):
            path = os.path.join(self.config.out, name)
            if not os.path.exists(path):
                continue
            if name == LAST:     # the model in memory: chosen above
                saved, tuned[name] = self.model, choice
            else:
                saved = keras.saving.load_model(path)
                if all(np.array_equal(a, b) for a, b in zip(saved.trainable_weights, self.model.trainable_weights)):
                    saved.set_weights(self.model.get_weights())   # the last epoch's weights: the same choice
                    tuned[name] = choice
                else:
                    inference = float32_model(saved)
                    tuned[name] = self.task.tune_model(inference, self.info, split)
                    if inference is not saved:
                        saved.set_weights(inference.get_weights())
            with outputs.atomic_file(path) as tmp:
                saved.save(tmp)
        echo(f"tuned after training ({', '.join(tuned)}): "
             + ", ".join(f"{k} {v}" for k, v in choice.items() if not isinstance(v, dict)))
        return tuned

    def precision_note(self) -> str:
        """What the model computes in, and why when the config did not say."""
        policy = self.model.dtype_policy.name
        if self.config.mixed_precision is None and policy == "mixed_bfloat16":
            return (f"{policy} (this CPU computes bfloat16 natively: {native_bfloat16()}; "
                    "--no-mixed-precision for float32)")
        return policy

    def describe(self) -> str:
        """One line for the log: model, strategy, batch, data."""
        who = f"{self.worker.type} {self.worker.index}{' (chief)' if self.worker.chief else ''}: " \
            if self.worker.type else ""
        return (f"{who}{self.config.model}: {self.model.count_params():,} parameters; {type(self.strategy).__name__} "
                f"over {self.replicas} replica(s), global batch {self.global_batch}; "
                f"{self.info.num_records(self.train_splits)} training patches ({', '.join(self.train_splits)}), "
                f"{self.steps} steps/epoch"
                + (f"; budget {self.config.minutes:g} min (at most {self.config.epochs} epochs)"
                   if self.config.minutes is not None else "")
                + (f"; {self.config.recipe}" if self.config.recipe else "")
                + (f"; {self.precision_note()}" if self.model.dtype_policy.name != "float32" else "")
                + (f"; validation on {self.val_split!r}" if self.val_split else "; no validation split")
                + (f"; resuming at epoch {self.initial_epoch + 1}" if self.initial_epoch else "")
                + (f"\n{self.transfer.describe()}" if self.transfer is not None else ""))


def _check_run_dir(config: TrainConfig, worker: Worker, backup_dir: str) -> bool:
    """Creates RUN_DIR; returns True when a backup will be resumed.

    Under multiworker each worker checks only what it writes (the chief the run's files, every worker its
    own backup): the others' backup folders appear at their own pace.
    """
    has_backup = bool(run_folder.backup_metadata(backup_dir))
    owned = (RUN_JSON, HISTORY, BEST, LAST) if worker.chief else ()
    used = [n for n in owned if os.path.exists(os.path.join(config.out, n))]
    if os.path.exists(backup_dir) and (has_backup or not worker.type):
        used.append(os.path.relpath(backup_dir, config.out))
    if used and not config.resume:
        raise RunError(f"{config.out} already holds a run ({', '.join(used)}). Pass --resume"
                       + (" (on every worker)" if worker.type else "") + " to continue it, or choose another --out.")
    if config.resume and not has_backup and os.path.exists(os.path.join(config.out, RUN_JSON)):
        with open(os.path.join(config.out, RUN_JSON)) as f:
            previous = json.load(f)
        if previous.get("status") == "done":
            raise RunError(f"{config.out}: the run finished ({previous.get('metrics', {}).get('epochs')} epochs); "
                           "nothing to resume.")
    os.makedirs(config.out, exist_ok=True)
    return has_backup


def prepare_run(config: TrainConfig) -> Run:
    """Everything a loop needs for `config` (see the module's docstring); writes nothing but RUN_DIR/backup."""
    import keras
    import tensorflow as tf

    from stpkeras import pipeline
    from stpkeras.tasks import get_task

    started = time.time()
    configure_devices(config.devices)
    # First: under multiworker, no TensorFlow call may come before the strategy (see make_strategy).
    strategy = make_strategy(config.strategy)
    worker = worker_identity(strategy)
    multiworker = config.strategy == "multiworker"

    info = pipeline.load_info(config.data)
    if not info.num_records("all"):
        counts = info.manifest.get("counts", {})
        raise RunError(f"{config.data}: no records to train on ({counts.get('failed', 0)} of {counts.get('videos', 0)} "
                       f"videos failed to convert, {counts.get('skipped', 0)} skipped; dataset.json's `videos` say "
                       "why). Expected a converted folder with at least one record")
    # A task the data cannot serve (enhance without degradations or pairs) is a usage error (ValueError).
    task = get_task(config.task, dict(config.task_options)).for_data(info)
    config = scale_default_lr(config, task)
    try:
        # The task's classes: the data's labels for classify, mask or frame classes for segment, none for embed.
        labels = tuple(task.class_names(info))
    except ValueError as e:
        raise RunError(f"{config.data}: {e}") from e
    if task.needs_labels and len(labels) < 2:
        raise RunError(f"{config.data}: task {task.name!r} needs labelled data with >= 2 classes; "
                       f"the manifest lists {list(labels)}")
    train_splits, val_split = choose_splits(info, config)
    if config.data_service and task.element_fn(info, config.augment, training=True) is not None:
        raise RunError(f"--data-service: task {task.name!r} brings its own element; only (patch, label) "
                       "tasks are served so far")
    class_weight = None
    if config.class_weight:
        try:
            class_weight = task.class_weight(label_counts(info, train_splits), labels)
        except ValueError as e:
            raise RunError(f"{config.data}: --class-weight: {e}") from e
        if class_weight is None:
            raise RunError(f"--class-weight: task {task.name!r} has no classes to weight; "
                           "expected --task classify")

    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    train_records = info.num_records(train_splits)
    steps = config.steps_per_epoch or train_records // global_batch
    if train_records < global_batch:
        raise RunError(f"{config.data}: {train_records} training patches make no full batch of {global_batch} "
                       f"({config.batch_size} per replica x {replicas}); lower --batch-size")

    # Under multiworker every worker keeps its own backup.
    backup_dir = os.path.join(config.out, BACKUP, *([f"{worker.type}-{worker.index}"] if worker.type else []))
    resuming = _check_run_dir(config, worker, backup_dir)

    # Record-level sharding across workers needs the same shuffle order everywhere: a seed they share.
    seed = config.seed if config.seed is not None or not multiworker else shared_seed(strategy, info.sha256())
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if config.deterministic:
        # Same ops, same order, same bits: tf.data and the kernels both run deterministically.
        tf.config.experimental.enable_op_determinism()

    with strategy.scope():
        schedule = None
        if config.minutes is not None:
            from stpkeras.budget import BudgetSchedule
            # The steps the budget holds are not known yet: the loop sets them as it measures (`Budget`).
            saved = run_folder.backup_metadata(backup_dir) if resuming else {}
            schedule = BudgetSchedule(config.lr, config.warmup, 0.01 if config.schedule == "cosine" else 1.0,
                                      saved.get("expected_steps", config.epochs * steps))
        model, transfer = compile_model(config, task, info.spec, labels, total_steps=config.epochs * steps,
                                        schedule=schedule)
        initial_epoch = run_folder.restore_backup(backup_dir, model) if resuming else 0
    budget = None
    if schedule is not None:
        from stpkeras.budget import Budget
        agree = float
        if multiworker:
            def agree(seconds: float) -> float:
                # Every worker takes the mean of the workers' clocks: the same learning rate, the same last step.
                local = strategy.run(lambda: tf.constant(seconds, tf.float32))
                return float(strategy.reduce("MEAN", local, axis=None))
        budget = Budget(config.minutes, steps, config.epochs, schedule, initial_epoch=initial_epoch,
                        spent=run_folder.backup_metadata(backup_dir).get("train_seconds", 0.0) if resuming else 0.0,
                        agree=agree)
    train_ds, val_ds, val_steps, trace_epoch = _datasets(config, info, task, strategy, train_splits, val_split,
                                                         seed, skip_batches=initial_epoch * steps)

    # The task's figure shows the validation split (else the training one) to the chief, which writes the folder.
    reporter = task.reporter(info, val_split or train_splits, config.out) if worker.chief else None
    return Run(config=config, info=info, task=task, labels=labels, train_splits=train_splits, val_split=val_split,
               strategy=strategy, worker=worker, seed=seed, steps=steps, val_steps=val_steps, train_ds=train_ds,
               val_ds=val_ds, model=model, initial_epoch=initial_epoch, class_weight=class_weight,
               backup_dir=backup_dir, trace_epoch=trace_epoch, started=started, transfer=transfer, reporter=reporter,
               budget=budget)


def compile_model(config: TrainConfig, task, spec, labels, total_steps: int, schedule=None):
    """(The task's model for `config.model`, compiled; the `finetune.Transfer` of `config.init_from` or None).

    AdamW on `learning_rate`'s schedule (per-layer factors on the backbone's steps with `backbone_lr_scale`
    or `layer_decay`), the task's loss and metrics, XLA when `config.jit`, mixed precision by
    `mixed_policy(config.mixed_precision)`; `schedule`, when given, replaces `learning_rate`'s (a timed run's
    `budget.BudgetSchedule`). With `init_from`, the backbone's weights are the earlier run's (`stpkeras.finetune`),
    frozen with `freeze_backbone`. Call it in the strategy's scope."""
    import keras
    import tensorflow as tf

    previous_policy = keras.mixed_precision.global_policy()
    # float16 with loss scaling on GPUs (compile() wraps the optimizer); bfloat16 where there is none.
    # Layers take the policy when they are made: it is set for the model's building only.
    policy = mixed_policy(config.mixed_precision, bool(tf.config.list_logical_devices("GPU")), task.AUTO_BFLOAT16)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        model = task.build_model(config.model, spec, labels, dict(config.model_options))
        transfer, scales = None, {}
        if config.init_from:
            from stpkeras import finetune
            transfer = finetune.transfer(model, finetune.load_source(config.init_from), config.init_from,
                                         task.HEAD)
            if config.freeze_backbone:
                finetune.freeze(model, transfer.taken)
                transfer = dataclasses.replace(transfer, frozen=True)
            layer_scales = finetune.lr_scales(transfer.taken, config.backbone_lr_scale, config.layer_decay)
            transfer = dataclasses.replace(transfer, lr_scales=tuple(layer_scales.items()))
            scales = finetune.variable_scales(model, layer_scales)
        if schedule is None:
            schedule = learning_rate(config, total_steps)
        if scales:
            from stpkeras.finetune import ScaledAdamW
            optimizer = ScaledAdamW(schedule, weight_decay=config.weight_decay, beta_2=task.ADAM_BETA_2,
                                    lr_scales=scales)
        else:
            optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay, beta_2=task.ADAM_BETA_2)
        model.compile(optimizer=optimizer, loss=task.loss(), metrics=task.metrics(labels), jit_compile=config.jit)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return model, transfer


def _datasets(config: TrainConfig, info, task, strategy, train_splits, val_split, seed, skip_batches: int):
    """(training dataset, validation dataset or None, validation steps or None, trace epoch variable or None)."""
    import tensorflow as tf

    from stpkeras import pipeline

    multiworker = config.strategy == "multiworker"
    train_element = task.element_fn(info, config.augment, training=True)
    val_element = task.element_fn(info, config.augment, training=False)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    workers = pipeline.num_workers(strategy)
    policy = pipeline.shard_policy(len(info.files(train_splits)), workers)
    by_record = policy != tf.data.experimental.AutoShardPolicy.FILE
    # Record-level sharding keeps every N-th element of each worker's full copy of the stream: the
    # copies must be in the same order everywhere, so the parallel stages may not reorder.
    common = dict(batch_size=config.batch_size, strategy=strategy, seed=seed,
                  deterministic=config.deterministic or (multiworker and by_record))
    # One repeated stream for the whole run: `fit` and the custom loop count `steps` batches an epoch. A dataset
    # that ends each epoch makes Keras build a new iterator every epoch, and on 2 cores some of those iterators
    # left the training ops on one core: epochs of the enhancement benchmark took 45 s or 82 s at random (same
    # CPU time), against 45 s every epoch with one iterator. Across workers the fixed count also keeps shards of
    # unequal size from leaving one worker with an empty batch while the others still step (TF 2.21's oneDNN
    # MaxPoolGrad aborts the process on one: "Check failed: dtype()").
    # A resumed run goes on with the batches the killed one had not reached: with a seed, the stream is the same
    # on every run, so skipping the batches of the finished epochs continues it exactly. (Checkpointing the
    # iterator instead is not open to us: `fit` makes its own, distributed, iterator, and `tf.distribute`'s
    # iterators cannot be checkpointed.) Not across workers: sharding applies after the skip there.
    skip = skip_batches if config.seed is not None and not multiworker else 0
    # The custom loop traces the records it trains on (`trace_dir`): without a task element they then come as
    # dicts with their video id and grid index; the step uses only patch and label.
    as_supervised = train_element is not None or not (multiworker and config.trace_dir)
    val_ds, val_steps = None, None
    if val_split and not multiworker:
        val_ds = pipeline.make_dataset(info, val_split, training=False, element_fn=val_element, **common)
    elif val_split:
        # Every worker must step as often as the others: full global batches only, a fixed count.
        val_steps = info.num_records(val_split) // global_batch
        if val_steps:
            val_ds = pipeline.make_dataset(info, val_split, training=False, element_fn=val_element, repeat=True,
                                           drop_remainder=True, **common)
    trace_epoch = None
    if config.data_service:
        # Decoding and augmentation run on the tf.data service's workers (see data_service.py); its dataset
        # ends each epoch itself (each record once per epoch).
        from stpkeras.data_service import make_service_dataset
        if config.trace_dir:
            os.makedirs(config.trace_dir, exist_ok=True)
        trace_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)
        train_ds = make_service_dataset(
            info, train_splits, config.data_service, batch_size=global_batch, augment=config.augment,
            shuffle_buffer=config.shuffle_buffer, seed=config.seed, trace_epoch=trace_epoch,
            trace_file=os.path.join(config.trace_dir, "trainer.txt") if config.trace_dir else None)
    else:
        train_ds = pipeline.make_dataset(info, train_splits, training=True, element_fn=train_element,
                                         augment=None if train_element is not None else config.augment,
                                         shuffle_buffer=config.shuffle_buffer, repeat=True, skip_batches=skip,
                                         as_supervised=as_supervised, **common)

    return train_ds, val_ds, val_steps, trace_epoch
