"""Task stage: what a task adds to a model family: its head, targets, loss, metrics and monitor, and its defaults.

`classify` (single- or multi-label), `regress` (K values per patch), `embed` (self-supervised contrastive),
`segment` (per voxel or per frame) and `enhance` (degraded pixels -> clean pixels) share one interface
in the `TASKS` registry, so the training set-up (`stpkeras.setup`) never branches on the task's name. Each
task names its default model family and augmentation: `TrainConfig(task="enhance")` means what `stp train
--task enhance` means.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import keras

from stpkeras.augment import COPY_AUGMENT, DEFAULT_AUGMENT


@dataclasses.dataclass(frozen=True)
class Task:
    """The interface every task implements."""

    name: str = ""
    # The metric that picks `best.keras` (with `val_` in front when there is a validation split).
    monitor: str = "loss"
    monitor_mode: str = "min"
    # Whether the task needs labelled records (the pipeline then yields `(patch, label)`).
    needs_labels: bool = False
    # What a run of the task uses unless told otherwise (`TrainConfig.model` / `augment` None).
    default_model: str = "stcnn"
    default_augment: Tuple[str, ...] = DEFAULT_AUGMENT
    # `TrainConfig.batch_size` / `lr` None: the task's (per replica; the peak learning rate).
    DEFAULT_BATCH_SIZE: ClassVar[int] = 32
    DEFAULT_LR: ClassVar[float] = 1e-3
    # A short budget on CPUs alone: with `--minutes` x the CPU cores at most CPU_BUDGET_CORE_MINUTES and no GPU,
    # the default model family (untouched options) gets CPU_BUDGET_OPTIONS, CPU_BUDGET_TASK_OPTIONS and, lr unset,
    # CPU_BUDGET_LR (`TrainConfig.recipe` says so). 0: the task has no such recipe.
    CPU_BUDGET_CORE_MINUTES: ClassVar[float] = 0.0
    CPU_BUDGET_OPTIONS: ClassVar[Tuple[Tuple[str, object], ...]] = ()
    CPU_BUDGET_TASK_OPTIONS: ClassVar[Tuple[Tuple[str, object], ...]] = ()   # those the user left unset
    CPU_BUDGET_LR: ClassVar[float] = 1e-3
    # The recipe's batch size, batch size unset, when the run computes in float32 (None: the task's default).
    CPU_BUDGET_FLOAT32_BATCH_SIZE: ClassVar[Optional[int]] = None
    # `TrainConfig.mixed_precision` None: train in bfloat16 on a CPU that computes it natively (and no GPU), where
    # the task measured that it learns as well per step (`setup.mixed_policy`); float32 otherwise.
    AUTO_BFLOAT16: ClassVar[bool] = False
    # Fields `for_data` sets from the manifest: not options a user passes.
    FROM_DATA: ClassVar[Tuple[str, ...]] = ()
    # The layers that belong to the task and its labels: always new under `--init-from` (stpkeras.finetune).
    HEAD: ClassVar[Tuple[str, ...]] = ("logits",)
    # AdamW's second-moment decay for the task's runs (`setup.compile_model`).
    ADAM_BETA_2: ClassVar[float] = 0.999

    def lr_scale(self) -> Tuple[float, str]:
        """(The factor on a default learning rate, the task's or the CPU-budget recipe's, for the data `for_data`
        found; what about the data asks for it). A learning rate the user gives is kept (`setup.prepare_run`)."""
        return 1.0, ""

    def options(self) -> Dict[str, object]:
        """The task's own settings (e.g. enhance's `degrade`, `pixel_loss`), as `get_task` takes them."""
        return {name: getattr(self, name) for name in option_names(self)}

    def recorded(self) -> Dict[str, object]:
        """The options and what `for_data` set from the data, as JSON (run.json's and the export's
        `task_options`): what a model's readers need to know (e.g. multi-label, the values' scale)."""
        names = option_names(self) + tuple(self.FROM_DATA)
        return {n: list(getattr(self, n)) if isinstance(getattr(self, n), tuple) else getattr(self, n)
                for n in names}

    def build_model(self, model: str, spec, labels: Sequence[str], options: Dict[str, object]) -> keras.Model:
        raise NotImplementedError

    def loss(self) -> keras.losses.Loss:
        raise NotImplementedError

    def metrics(self, labels: Sequence[str]) -> List[keras.metrics.Metric]:
        raise NotImplementedError

    def class_weight(self, counts: Dict[str, int], labels: Sequence[str]) -> Optional[Dict[int, float]]:
        return None

    def class_names(self, info) -> Sequence[str]:
        """The classes the model predicts, from the data's `DataInfo` (recorded as run.json's `labels`)."""
        return info.labels

    def for_data(self, info) -> "Task":
        """The task specialised for the data it trains on (e.g. segment: masks or frame labels)."""
        return self

    def element_fn(self, info, augment: Sequence[str], training: bool):
        """The task's own `(serialized record, seed) -> element` for `make_dataset`, or None for
        `(patch, label)` with the pipeline's augmentation."""
        return None

    def reporter(self, info, split, run_dir: str):
        """An object whose `update(model, epoch, final=False)` draws the task's own figure into the run folder
        as epochs finish (bounded cost), or None. Both loops call it after the curves."""
        return None

    def check_model(self, model, info, split) -> Optional[dict]:
        """A check of the trained model on a few patches of `split` at the end of a run (run.json's `check`),
        with a `warning` when the run trained a model that does nothing useful, or None (no check)."""
        return None

    def tunes(self, model) -> bool:
        """Whether `model` leaves choices to the end of its run (`tune_model`)."""
        return False

    def tune_model(self, model, info, split) -> Optional[dict]:
        """Choices a trained model leaves to the end of its run (its non-trainable settings), made on patches of
        `split` and set in `model`: what was chosen and measured (run.json's `tuned`). `stp train` runs it on
        each model file of a finished run whose model it `tunes`, before `check_model`."""
        return None


@dataclasses.dataclass(frozen=True)
class Classify(Task):
    """One label per patch: `logits [B, num_classes]` against `int32 [B]` labels (softmax cross-entropy).

    Multi-label (`multi_label`): any number of classes per patch, `logits [B, C]` against `float32 [B, C]`
    multi-hot targets (sigmoid, binary cross-entropy), monitored by the PR-AUC over classes. None (the
    default) takes the mode from the data: multi-label when the manifest's `label_mode` is "multi". True on
    single-label data trains sigmoid outputs on one-hot targets; False on multi-label data is refused.
    """

    name: str = "classify"
    monitor: str = "accuracy"
    monitor_mode: str = "max"
    needs_labels: bool = True
    multi_label: Optional[bool] = None
    # Flips that swap mirrored classes (`augment.parse_flip_labels`): e.g. ("h:left=right", "v:up=down").
    flip_labels: Tuple[str, ...] = ()
    # More such symmetries, for test time only: `--tta` (evaluate, predict, export) averages over them too.
    tta_flip_labels: Tuple[str, ...] = ()

    def for_data(self, info) -> "Classify":
        multi = info.label_mode == "multi"
        if self.multi_label is False and multi:
            raise ValueError(f"{info.root}: the records are multi-label (label_mode 'multi': no single label "
                             "per patch); train them with multi-label outputs (leave out multi_label=False)")
        if self.multi_label or multi:
            if self.flip_labels or self.tta_flip_labels:
                raise ValueError(f"{info.root}: flip_labels swaps one label per patch; multi-label records have none")
            return dataclasses.replace(self, multi_label=True, monitor="pr_auc")
        from stpkeras.augment import parse_flip_labels, require_square
        for flips in (self.flip_labels, self.tta_flip_labels):   # a bad pair fails before training starts
            require_square(parse_flip_labels(flips, info.labels), info.spec.height, info.spec.width)
        return dataclasses.replace(self, multi_label=False, flip_labels=tuple(self.flip_labels),
                                   tta_flip_labels=tuple(self.tta_flip_labels))

    def build_model(self, model, spec, labels, options):
        from stpkeras.models import ENHANCE_MODELS, build_model
        if model in ENHANCE_MODELS:
            raise ValueError(f"Invalid value for argument `model`. {model!r} outputs pixels (task enhance); "
                             f"task {self.name} needs a classifier")
        return build_model(model, spec, len(labels), **dict(options))

    def loss(self):
        if self.multi_label:
            return keras.losses.BinaryCrossentropy(from_logits=True)
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def top_k(self, num_classes: int) -> int:
        """k of the top-k metric: 5, or fewer for fewer classes (k >= num_classes is always 1)."""
        return max(1, min(5, num_classes - 1))

    def metrics(self, labels):
        if self.multi_label:
            # Threshold 0 on the logits: a probability of 0.5.
            return [keras.metrics.AUC(curve="PR", multi_label=True, num_labels=len(labels), from_logits=True,
                                      name="pr_auc"),
                    keras.metrics.BinaryAccuracy(threshold=0.0, name="binary_accuracy")]
        k = self.top_k(len(labels))
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if k > 1:
            metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=k, name=f"top{k}"))
        return metrics

    def class_weight(self, counts, labels):
        """'Balanced' weights n / (classes x n_c), so every class counts as much in the loss."""
        if self.multi_label:
            raise ValueError("class weights weigh one class per patch; multi-label outputs have none")
        total = sum(counts.get(name, 0) for name in labels)
        missing = [name for name in labels if not counts.get(name)]
        if missing:
            raise ValueError(f"class weights need every class in the training split; {missing} have no patches")
        return {i: total / (len(labels) * counts[name]) for i, name in enumerate(labels)}

    def element_fn(self, info, augment, training):
        if not self.multi_label:
            if training and self.flip_labels:
                from stpkeras.pipeline import flipped_label_element
                return flipped_label_element(info, augment, self.flip_labels)
            return None  # (patch, label) with the pipeline's augmentation
        from stpkeras.pipeline import target_element
        from tfrecords_tools import schema
        # Multi-hot targets of multi-label data; one-hot ones from the label of single-label data.
        key = schema.MULTI_HOT if info.label_mode == "multi" else schema.LABEL
        return target_element(info, key, augment if training else ())


@dataclasses.dataclass(frozen=True)
class Regress(Task):
    """K numeric values per patch (the records' `value/data`, named by the manifest's `value_names`).

    Any classifier family with K outputs, ending in a layer that de-standardises them
    (`stpkeras.models.regression`): the model answers in the data's units. The loss (`value_loss`: mse
    or huber) is taken on values standardised by the training records' mean and deviation, which
    `for_data` reads from the records ("train" when the data has it, else every split).
    """

    name: str = "regress"
    monitor: str = "loss"
    monitor_mode: str = "min"
    # Flip only: values may measure the pixels themselves (a quality score, a brightness), which crop's
    # resize (sharpness) and colour jitter would change under an unchanged target.
    default_augment: Tuple[str, ...] = ("flip",)
    value_loss: str = "mse"
    value_mean: Tuple[float, ...] = ()
    value_std: Tuple[float, ...] = ()
    FROM_DATA: ClassVar[Tuple[str, ...]] = ("value_mean", "value_std")

    def __post_init__(self):
        from stpkeras.models.regression import REGRESSION_LOSSES
        if self.value_loss not in REGRESSION_LOSSES:
            raise ValueError(f"Invalid value for argument `value_loss`. Expected one of {REGRESSION_LOSSES}. "
                             f"Received value_loss={self.value_loss!r}")

    def for_data(self, info) -> "Regress":
        from stpkeras.pipeline import value_stats
        if not info.value_names:
            raise ValueError(f"{info.root}: task regress needs records with values (`value/data`, named by the "
                             "manifest's value_names): convert a CSV with numeric value columns")
        mean, std = value_stats(info, "train" if "train" in info.splits else None)
        return dataclasses.replace(self, value_mean=tuple(mean), value_std=tuple(std))

    def class_names(self, info):
        return info.value_names

    def build_model(self, model, spec, labels, options):
        from stpkeras.models import ENHANCE_MODELS
        from stpkeras.models.regression import build_regressor
        if model in ENHANCE_MODELS:
            raise ValueError(f"Invalid value for argument `model`. {model!r} outputs pixels (task enhance); "
                             "task regress needs a classifier family (its K outputs become the values)")
        return build_regressor(model, spec, self.value_mean, self.value_std, **dict(options))

    def loss(self):
        from stpkeras.models.regression import RegressionLoss
        return RegressionLoss(self.value_loss, self.value_std)

    def metrics(self, labels):
        return [keras.metrics.MeanAbsoluteError(name="mae"), keras.metrics.RootMeanSquaredError(name="rmse")]

    def element_fn(self, info, augment, training):
        from stpkeras.pipeline import target_element
        from tfrecords_tools import schema
        return target_element(info, schema.VALUES, augment if training else ())


@dataclasses.dataclass(frozen=True)
class Embed(Task):
    """Self-supervised contrastive learning, no labels: two augmented views of each patch are positives
    (`stpkeras.embedding`). The model maps views `uint8 [B, 2, T, H, W, C]` to projections `[B, 2, P]`;
    retrieval uses its encoder's pooled `features`. Model options go to the backbone. The views are
    copies by default (`augment.COPY_AUGMENT`: shifts, speed changes, crops, letterbox, rescaling,
    colour, re-encoding), so what the features keep is what survives copying."""

    name: str = "embed"
    default_augment: Tuple[str, ...] = COPY_AUGMENT
    monitor: str = "loss"
    monitor_mode: str = "min"
    needs_labels: bool = False
    temperature: float = 0.1
    HEAD: ClassVar[Tuple[str, ...]] = ("projection_hidden", "projection")

    def class_names(self, info):
        return ()

    def build_model(self, model, spec, labels, options):
        from stpkeras.embedding import build_contrastive
        from stpkeras.models import build_model
        # The backbone's classifier head (2 dummy classes) is not on the path to the projections: unused.
        return build_contrastive(build_model(model, spec, 2, **dict(options)), spec)

    def loss(self):
        from stpkeras.embedding import ContrastiveLoss
        return ContrastiveLoss(self.temperature)

    def metrics(self, labels):
        from stpkeras.embedding import PairAccuracy
        return [PairAccuracy()]

    def element_fn(self, info, augment, training):
        from stpkeras.embedding import make_views
        # Validation views are augmented too (seeded, the same every epoch): identical views would be trivial.
        return make_views(info.encoding, info.spec, augment)


@dataclasses.dataclass(frozen=True)
class Segment(Task):
    """A class per voxel (records with a `mask`) or per frame (records with frame labels from intervals).

    `for_data` picks the kind from the manifest. The model ('unet3d') outputs logits `[B, T, H, W, K]`
    (mask) or `[B, T, K]` (frames); unlabelled voxels/frames (-1) count in neither loss nor IoU.
    The loss is cross-entropy, plus `dice` x soft Dice for masks, where the objects are a small share
    of the voxels (`SegmentationLoss`); frames are classes of similar size: cross-entropy alone.
    """

    name: str = "segment"
    monitor: str = "mean_iou"
    monitor_mode: str = "max"
    needs_labels: bool = True
    default_model: str = "unet3d"
    kind: str = ""   # "mask" or "frames", set by for_data
    dice: float = 1.0
    FROM_DATA: ClassVar[Tuple[str, ...]] = ("kind",)

    def for_data(self, info) -> "Segment":
        from stpkeras.segmentation_data import data_kind
        return dataclasses.replace(self, kind=data_kind(info))

    def class_names(self, info):
        from stpkeras.segmentation_data import class_names
        return class_names(info, self.kind or None)

    def build_model(self, model, spec, labels, options):
        from stpkeras.models.segmentation import build_segmenter
        return build_segmenter(model, spec, len(labels), kind=self.kind, **dict(options))

    def loss(self):
        from stpkeras.models.segmentation import SegmentationLoss
        return SegmentationLoss(dice=self.dice if self.kind == "mask" else 0.0)

    def metrics(self, labels):
        k = len(labels)
        metrics = [keras.metrics.MeanIoU(k, sparse_y_pred=False, ignore_class=-1, name="mean_iou")]
        metrics += [keras.metrics.IoU(k, [i], sparse_y_pred=False, ignore_class=-1, name=f"iou_{i}")
                    for i in range(k)]
        return metrics + [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def element_fn(self, info, augment, training):
        from stpkeras.segmentation_data import make_element
        return make_element(info, self.kind, augment if training else ())


PIXEL_LOSSES = ("l1", "l2")
# H.264 and MPEG-4 transform 8x8 and 4x4 blocks inside 16x16 macroblocks: crops of codec pairs stay on this grid.
CODEC_BLOCK = 8


@dataclasses.dataclass(frozen=True)
class Enhance(Task):
    """Restoration: a degraded `uint8 [B, T, H, W, 3]` patch -> float32 pixels `[B, T, H, W, 3]`, against the
    clean patch.

    The clean patch is the record's patch, degraded on the fly by `degrade`
    (`stpkeras.degrade`, e.g. `('noise:25',)`), or, for paired data (`stp
    convert` of a `path,target` CSV), the record's target. The loss is the
    mean absolute (`l1`) or squared (`l2`) error in 0-255 units; PSNR and SSIM
    (`stpkeras.quality`) are measured on the clipped, rounded output.
    """

    name: str = "enhance"
    monitor: str = "psnr"
    monitor_mode: str = "max"
    needs_labels: bool = False
    default_model: str = "dncnn3d"
    # Flip only: crop's nearest-neighbour resize would put blocks in the clean target. (The other tasks
    # leave flip out: a horizontal flip swaps left and right motion, which a classifier may need to tell.)
    default_augment: Tuple[str, ...] = ("flip",)
    degrade: Tuple[str, ...] = ()
    pixel_loss: str = "l1"
    # Train on random crops of at most `crop` x `crop` pixels of each patch (input and target alike; 0: whole
    # patches). A fully convolutional model learns from more, cheaper steps; it still enhances whole patches.
    crop: int = 0
    # The share of clean patches softened (downscaled to 25-75% and back) before they are degraded: footage
    # with less fine detail than the training videos', so that a denoiser trained on camera footage still
    # averages flat, smooth animation (camera -> animation +1.30 -> +1.93-2.71 dB over a tuned blur; docs/benchmarks.md,
    # issue 20). None: SOFTEN on self-supervised RGB data, 0 on pairs (their input is the codec's, not ours).
    soften: Optional[float] = None
    paired: bool = False   # set by for_data from the manifest
    FROM_DATA: ClassVar[Tuple[str, ...]] = ("paired",)
    HEAD: ClassVar[Tuple[str, ...]] = ("residual",)
    # Small batches, a higher rate: a pixel loss gives every patch thousands of targets, so within a time
    # budget more, cheaper steps learn more (the enhancement benchmark's recipe, benchmarks/enhance.py).
    DEFAULT_BATCH_SIZE: ClassVar[int] = 8
    DEFAULT_LR: ClassVar[float] = 2e-3
    # The default 5-layer stack needs thousands of steps (+3.73 dB over a Gaussian blur after 5,256). With 15
    # minutes on 2 cores (30 core-minutes) on whole 64x64 patches it got 832-2,046 steps and ended 4.28 dB below
    # the blur to 0.75 above it; on 32x32 crops at lr 1e-3 a step costs a quarter and the same stack passes the
    # blur by far more on both kinds of unseen footage (docs/benchmarks.md, issue 20). The bound is an estimate:
    # measured at 30.
    CPU_BUDGET_CORE_MINUTES: ClassVar[float] = 120.0
    CPU_BUDGET_OPTIONS: ClassVar[Tuple[Tuple[str, object], ...]] = ()
    CPU_BUDGET_TASK_OPTIONS: ClassVar[Tuple[Tuple[str, object], ...]] = (("crop", 32),)
    CPU_BUDGET_LR: ClassVar[float] = 1e-3
    # In float32 (CPUs without bfloat16 units, or --no-mixed-precision) the convolutions already run at about 60%
    # of the CPU's peak, so smaller steps are the way to more updates: a step of 2 crops costs about half one of
    # 4 and a quarter one of 8. 15 minutes of batches of 2 gained +2.68 / +2.45 / +2.67 dB on the two kinds of
    # unseen footage against +2.66 / +1.99 / +2.27 with 4 and +2.17 / +1.31 with 8, same seeds (issue 20's
    # denoising benchmark, docs/benchmarks.md). In bfloat16 the task's 8 stays (measured to the goal).
    CPU_BUDGET_FLOAT32_BATCH_SIZE: ClassVar[Optional[int]] = 2
    SOFTEN: ClassVar[float] = 0.5
    # On an AMX CPU a 32x32-crop step costs 0.26x float32's CPU, and 15 minutes train 2.8x the steps (issue 20's
    # denoising benchmark, docs/benchmarks.md).
    AUTO_BFLOAT16: ClassVar[bool] = True
    # Codec pairs differ by a few grey levels where noise:25 differs by 25: at the denoiser's rate (the CPU recipe's
    # 1e-3) the stack stayed the identity on H.264 pairs in 3 runs of 4 (15 minutes; a training loss flat for 30
    # epochs) and gained +0.03 dB in the fourth; at a fifth of it +0.074 / +0.123 (camera, two seeds) and +0.126 dB
    # (animation) on the same pairs (issue 20, docs/benchmarks.md). Paired data's default rate is the task's (or
    # the recipe's) x this.
    PAIRED_LR_SCALE: ClassVar[float] = 0.2

    def __post_init__(self):
        from stpkeras.degrade import describe, parse_degrade
        # Stored in canonical form (the order they apply in), as run.json records them.
        object.__setattr__(self, "degrade", describe(parse_degrade(self.degrade)))
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"Invalid value for argument `pixel_loss`. Expected one of {PIXEL_LOSSES}. "
                             f"Received pixel_loss={self.pixel_loss!r}")
        if not isinstance(self.crop, int) or isinstance(self.crop, bool) or self.crop < 0:
            raise ValueError("Invalid value for argument `crop`. Expected a side in pixels >= 1, or 0 for whole "
                             f"patches. Received crop={self.crop!r}")
        if self.soften is not None and (isinstance(self.soften, bool) or not isinstance(self.soften, (int, float))
                                        or not 0.0 <= self.soften <= 1.0):
            raise ValueError("Invalid value for argument `soften`. Expected a share of patches in [0, 1] (0: none), "
                             f"or None for the task's default. Received soften={self.soften!r}")

    def for_data(self, info) -> "Enhance":
        paired = bool(info.manifest.get("paired"))
        if not paired and not self.degrade:
            raise ValueError(f"{info.root}: task enhance needs clean/degraded pairs: pass --degrade KIND:PARAM "
                             "(e.g. noise:25) to degrade the patches on the fly, or convert a path,target CSV")
        from stpkeras.augment import resamplable
        rgb = resamplable(info.spec.pixels)
        if self.soften and (paired or not rgb):
            raise ValueError(f"{info.root}: soften (a share of clean patches downscaled and back before degrading) "
                             f"needs self-supervised rgb patches; expected soften 0 on "
                             f"{'paired data' if paired else repr(info.spec.pixels) + ' pixels'}. "
                             f"Received soften={self.soften}")
        soften = self.soften
        if soften is None:   # the task's default: soften clean patches where there are any, and rgb ones
            soften = self.SOFTEN if rgb and not paired else 0.0
        return dataclasses.replace(self, paired=paired, soften=float(soften))

    def class_names(self, info):
        return ()

    def lr_scale(self) -> Tuple[float, str]:
        return (self.PAIRED_LR_SCALE, "paired data") if self.paired else (1.0, "")

    def build_model(self, model, spec, labels, options):
        from stpkeras.models import ENHANCE_MODELS, build_model
        if model not in ENHANCE_MODELS:
            raise ValueError(f"Invalid value for argument `model`. Task enhance needs one of {list(ENHANCE_MODELS)}. "
                             f"Received model={model!r}")
        from stpkeras.models import model_options
        from stpkeras.models.layers import PixelPhases
        options = dict(options)
        if self.paired and "deblock" in model_options(model):
            # Paired data (codec restoration, `stp convert --pairs`): a deblocking stage after the model, its
            # threshold chosen at the end of training (`tune_model`; 0 where it does not help).
            options.setdefault("deblock", CODEC_BLOCK)
        built = build_model(model, spec, spec.channels, **options)
        if self.crop and self.crop < max(spec.height, spec.width):
            if built.input.shape[2] is not None:
                raise ValueError(f"Invalid value for argument `crop`. Model {model!r} with these options takes "
                                 f"whole {spec.height}x{spec.width} patches only; expected crop=0 or a fully "
                                 f"convolutional model (dncnn3d). Received crop={self.crop}")
            factor = max((layer.factor for layer in built.layers if isinstance(layer, PixelPhases)), default=1)
            if self.crop % factor:
                raise ValueError(f"Invalid value for argument `crop`. Model {model!r} with these options splits "
                                 f"frames into {factor}x{factor} blocks; expected a crop that {factor} divides. "
                                 f"Received crop={self.crop}")
        return built

    def loss(self):
        if self.pixel_loss == "l2":
            return keras.losses.MeanSquaredError()
        return keras.losses.MeanAbsoluteError()

    def metrics(self, labels):
        from stpkeras.quality import PSNR, SSIM
        return [PSNR(), SSIM()]

    # The end-of-run check: the model on the first CHECK_PATCHES patches of the validation split (else the
    # training data), degraded as validation is, CHECK_BATCH at a time (whole patches: bounded memory).
    CHECK_PATCHES: ClassVar[int] = 32
    CHECK_BATCH: ClassVar[int] = 4
    # An output - input spread (std over a patch's voxels, per channel, 0-255 units) below this: the model adds
    # one value per channel everywhere, i.e. returns its input. It starts so (the zero-initialised residual
    # layer), and stays so when its ReLU layers go silent (issue 20: one run of 15 minutes ended there with
    # nothing said). A trained denoiser's spread is about its noise level.
    SILENT_SPREAD: ClassVar[float] = 0.01

    def check_model(self, model, info, split):
        import numpy as np
        import tensorflow as tf

        from stpkeras import pipeline
        from stpkeras.quality import psnr

        element = self.element_fn(info, (), training=False)
        dataset = pipeline.make_dataset(info, split, batch_size=self.CHECK_BATCH, training=False, element_fn=element,
                                        seed=0, deterministic=True)
        before, after, spread = [], [], []
        for x, y in dataset.take(-(-self.CHECK_PATCHES // self.CHECK_BATCH)):
            out = tf.cast(model(x, training=False), tf.float32)
            before.append(psnr(x, y).numpy())
            after.append(psnr(out, y).numpy())
            spread.append(np.mean(np.std(out.numpy() - x.numpy().astype(np.float32), axis=(1, 2, 3)), axis=-1))
        if not before:
            return None
        patches = sum(len(v) for v in after)
        before, after, spread = (float(np.mean(np.concatenate(v))) for v in (before, after, spread))
        where = f"on {patches} patches of {split!r}" if isinstance(split, str) else \
            f"on {patches} training patches"
        warning = None
        if spread < self.SILENT_SPREAD:
            warning = (f"the model returns its input: {where} its output differs from its input by one value per "
                       f"channel (spread {spread:.4f} of 255; a trained denoiser's is about its noise level). "
                       "Training did not move it from the identity it starts at (its ReLU layers went silent, or "
                       "it had too few steps): train again with a lower --lr, a longer --warmup or another --seed")
        elif after < before:
            warning = (f"the model's output is further from the clean patches than its input: {after:.2f} dB "
                       f"against {before:.2f} dB {where}")
        return {"split": split, "patches": patches, "input_psnr": round(before, 3), "output_psnr": round(after, 3),
                "residual_spread": round(spread, 4), "warning": warning}

    # The deblocking stage's threshold (`layers.ResidualPixels(deblock=...)`) is chosen from this grid (0: off;
    # in 0-255 units of an orthonormal 8x8 DCT) on TUNE_PATCHES patches spread over the validation split, else
    # the training data: the pairs the run learnt from, the footage's own re-encodings for `h264:auto` pairs.
    DEBLOCK_GRID: ClassVar[Tuple[float, ...]] = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
    TUNE_PATCHES: ClassVar[int] = 128
    TUNE_BATCH: ClassVar[int] = 16

    @staticmethod
    def _deblock_layer(model):
        return next((layer for layer in model.layers if getattr(layer, "deblock", 0)), None)

    def tunes(self, model) -> bool:
        return self._deblock_layer(model) is not None

    def tune_model(self, model, info, split):
        import numpy as np
        import tensorflow as tf

        from stpkeras import pipeline
        from stpkeras.models.layers import block_shrink
        from stpkeras.quality import psnr

        layer = self._deblock_layer(model)
        if layer is None:
            return None
        layer.deblock_threshold.assign(0.0)
        element = self.element_fn(info, (), training=False)
        dataset = pipeline.make_dataset(info, split, batch_size=self.TUNE_BATCH, training=False, element_fn=element,
                                        seed=0, deterministic=True)
        dataset = pipeline.spread(dataset, info.num_records(split), self.TUNE_PATCHES, self.TUNE_BATCH)

        @tf.function(reduce_retracing=True)
        def scores_of(x, y):   # one graph for the grid: eager, the small ops of 10 thresholds cost 15 s
            out = tf.cast(model(x, training=False), tf.float32)   # threshold 0: the stage returns its input
            return tf.stack([psnr(block_shrink(out, t, block=layer.deblock), y) for t in self.DEBLOCK_GRID])

        scores = [scores_of(x, y).numpy() for x, y in dataset]
        if not scores:
            return None
        mean = np.mean(np.concatenate(scores, axis=1), axis=1)
        best = int(np.argmax(mean))
        layer.deblock_threshold.assign(self.DEBLOCK_GRID[best])
        where = split if isinstance(split, str) else ",".join(split)
        return {"deblock_threshold": self.DEBLOCK_GRID[best], "deblock_block": layer.deblock, "split": where,
                "patches": int(sum(len(s[0]) for s in scores)),
                "psnr_by_threshold": {f"{t:g}": round(float(v), 3) for t, v in zip(self.DEBLOCK_GRID, mean)}}

    def element_fn(self, info, augment, training):
        from stpkeras.degrade import make_pairs
        # Validation is degraded too (seeded: the same degradations every epoch), but not augmented.
        # Crops of pairs keep the 8-pixel grid of a codec's blocks (the patches' origins are on it when the
        # converter's stride is a multiple of 8, its default): what a block-aware model (`downscale`) learns from.
        return make_pairs(info.encoding, info.spec, paired=self.paired, degradations=self.degrade,
                          augment=augment if training else (), crop=self.crop if training else 0,
                          crop_grid=CODEC_BLOCK if self.paired else 1, soften=(self.soften or 0.0) if training else 0.0)


@dataclasses.dataclass(frozen=True)
class Pretrain(Task):
    """Masked autoencoding (VideoMAE), no labels: the ViT encoder sees `1 - mask_ratio` of each patch's
    tubelet tubes and a light decoder (`decoder_dim`, `decoder_depth`) rebuilds the hidden ones; the loss is
    the squared error of their per-tubelet normalised pixels (`stpkeras.models.vivit.build_vivit_mae`).
    Model options are the `vivit` encoder's: `--init-from` the run fills a `vivit` with the same options."""

    name: str = "pretrain"
    monitor: str = "loss"
    monitor_mode: str = "min"
    needs_labels: bool = False
    default_model: str = "vivit"
    # Crops and flips make new patches to rebuild; a flip's swapped motion does no harm to reconstruction.
    default_augment: Tuple[str, ...] = ("flip", "crop")
    mask_ratio: float = 0.9
    decoder_dim: int = 64
    decoder_depth: int = 1
    # Another pretraining run's decoder is taken too: going on pretraining keeps it.
    HEAD: ClassVar[Tuple[str, ...]] = ()
    # MAE's and VideoMAE's 0.95: the step follows the changing scale of a transformer's gradients sooner.
    ADAM_BETA_2: ClassVar[float] = 0.95

    def __post_init__(self):
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise ValueError("Invalid value for argument `mask_ratio`. Expected a fraction in (0, 1). "
                             f"Received mask_ratio={self.mask_ratio!r}")

    def class_names(self, info):
        return ()

    def build_model(self, model, spec, labels, options):
        from stpkeras.models.vivit import build_vivit_mae
        if model != "vivit":
            raise ValueError("Invalid value for argument `model`. Task pretrain (masked autoencoding of tubelet "
                             f"tokens) needs model 'vivit'. Received model={model!r}; "
                             "other backbones pretrain with --task embed")
        return build_vivit_mae(spec, mask_ratio=self.mask_ratio, decoder_dim=self.decoder_dim,
                               decoder_depth=self.decoder_depth, **dict(options))

    def loss(self):
        from stpkeras.models.vivit import MaskedPixelLoss
        return MaskedPixelLoss()

    def metrics(self, labels):
        return []

    def element_fn(self, info, augment, training):
        from stpkeras.pretrain import make_element
        return make_element(info.encoding, info.spec, augment if training else ())

    def reporter(self, info, split, run_dir):
        from stpkeras.pretrain import reporter
        return reporter(info, split, run_dir)


@dataclasses.dataclass(frozen=True)
class Stabilize(Task):
    """Camera motion: a shaken `uint8 [B, T, H, W, 3]` patch -> `float32 [B, (T-1) * 4]`, the motion between each
    pair of neighbouring frames (`stpkeras.shake`: dx, dy, rotation and log-scale, in pixels at the patch's
    edge), against the motion of the shake drawn on the fly. Any converted folder of stable footage; labels
    are ignored.

    The default model, `softmotion`, reads each pair's motion off a cost volume by soft-argmax, in model
    pixels by construction (docs/stabilization.md: on unseen footage its gain is 0.99-1.00 where the
    regressor `motionnet` had 0.6); `motionnet` keeps the frames' layout up to a per-pair regression head (a
    pooled classifier backbone cannot see where things moved). The model ends in a layer that de-standardises
    its outputs (`stpkeras.models.regression`) by `motion_std`, the deviation of each component over the
    shakes the task draws (`shake.motion_std`, set by `for_data`; by 1 for softmotion, whose outputs are
    pixels already), and the Huber loss is taken on that standardised scale, so the four components weigh
    alike. The metric is the mean absolute error in pixels."""

    name: str = "stabilize"
    monitor: str = "motion_error"
    monitor_mode: str = "min"
    needs_labels: bool = False
    default_model: str = "softmotion"
    # The shake is the geometric augmentation (augmentations apply to the stable patch, before it; see
    # shake.py). Flip too: the footage's own motion is not in the targets, so a steady pan can be learnt as a
    # bias (a model trained on bikes + tree without flip added 2.4 px to every dx of the animation; bikes.mp4
    # moves about 0.85 px a frame in x); flipped half the time, a horizontal pan averages out.
    default_augment: Tuple[str, ...] = ("flip", "color")
    shift: float = 0.5          # largest translation, as a share of the margin shake.ZOOM leaves
    degrees: float = 1.5        # largest rotation
    zoom_percent: float = 2.0   # largest zoom
    motion_std: Tuple[float, ...] = ()
    FROM_DATA: ClassVar[Tuple[str, ...]] = ("motion_std",)

    def __post_init__(self):
        self.limits()  # checked here: a bad limit fails when the task is made

    def limits(self):
        from stpkeras.shake import ShakeLimits
        return ShakeLimits(self.shift, self.degrees, self.zoom_percent)

    def for_data(self, info) -> "Stabilize":
        from stpkeras.shake import motion_std
        # The shake warps whole frames of RGB pixels: a packed format's rows are not the frame's rows.
        if not info.spec.pixel_format.pixel_aligned or info.spec.frames < 2:
            raise ValueError(f"{info.root}: task stabilize needs rgb patches of >= 2 frames; the data has "
                             f"{info.spec.pixels} patches of {info.spec.frames} frame(s)")
        spec = info.spec
        return dataclasses.replace(self, motion_std=motion_std(spec.frames, spec.height, spec.width, self.limits()))

    def class_names(self, info):
        return ()

    def _std(self, pairs: int) -> Tuple[float, ...]:
        from stpkeras.shake import MOTION
        std = self.motion_std or (1.0,) * MOTION  # before for_data (a model built without data)
        return tuple(std) * pairs

    def build_model(self, model, spec, labels, options):
        from stpkeras.models import ENHANCE_MODELS
        from stpkeras.models.regression import build_regressor
        if model in ENHANCE_MODELS:
            raise ValueError(f"Invalid value for argument `model`. {model!r} outputs pixels (task enhance); "
                             "task stabilize needs softmotion, motionnet or a backbone with a vector output (e.g. c3d)")
        from stpkeras.models import PIXEL_MOTION_MODELS
        std = self._std(spec.frames - 1)
        if model in PIXEL_MOTION_MODELS:
            std = (1.0,) * len(std)  # its outputs are pixels already (a soft-argmax), not standardised values
        return build_regressor(model, spec, (0.0,) * len(std), std, **dict(options))

    def loss(self):
        from stpkeras.models.regression import RegressionLoss
        return RegressionLoss("huber", self.motion_std or (1.0,))

    def metrics(self, labels):
        return [keras.metrics.MeanAbsoluteError(name="motion_error")]

    def element_fn(self, info, augment, training):
        from stpkeras.shake import make_shaky
        # Validation is shaken too (seeded: the same shake every epoch), not augmented.
        return make_shaky(info.encoding, info.spec, self.limits(), augment if training else ())


TASKS: Dict[str, Task] = {"classify": Classify(), "regress": Regress(), "embed": Embed(), "segment": Segment(),
                          "enhance": Enhance(), "pretrain": Pretrain(), "stabilize": Stabilize()}


def get_task(name: str, options: Optional[Dict[str, object]] = None) -> Task:
    """The task `name`, with `options` (its dataclass fields, e.g. enhance's `degrade`) set; checked."""
    if name not in TASKS:
        raise ValueError(f"Invalid value for argument `task`. Expected one of {sorted(TASKS)}. Received task={name!r}")
    task = TASKS[name]
    if options:
        fields = option_names(task)
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(f"Invalid options {unknown} for task {name!r}. Expected some of {sorted(fields)}.")
        task = dataclasses.replace(task, **options)
    return task


def option_names(task: Task) -> Tuple[str, ...]:
    """The fields a task adds to `Task`, less those it sets from the data: what `get_task` accepts."""
    base = {f.name for f in dataclasses.fields(Task)}
    return tuple(f.name for f in dataclasses.fields(task) if f.name not in base and f.name not in task.FROM_DATA)

