"""Evaluate stage: a trained model on one split of a converted folder.

A classifier is measured at patch level and at video level; an enhancement model by PSNR/SSIM of
its output against the clean patches, beside the degraded input and classical baselines
(`evaluate_enhance`). Video level averages the logits of all patches of a video (`video/id`) and
takes the video's label. Both levels report accuracy, precision, recall and
F1 per class and macro-averaged, top-k accuracy and the confusion matrix
(rows: true class, columns: predicted), as JSON and as PNGs.

A multi-label classifier reports mAP (mean over classes of scikit-learn's average precision), each class's
AP, and precision, recall and F1 at a probability threshold (`multilabel_metrics`); a regressor MAE, RMSE,
Spearman's (SROCC) and Pearson's (PLCC) correlation per value (`regression_metrics`). Both at patch level
and at video level, where a video (or a segment: its `video/id` is `REL#t=START,END`) is the mean of its
patches' probabilities or values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from stpkeras import artifacts
from tfrecords_tools import outputs
from tfrecords_tools.errors import BadInput
from tfrecords_tools.verify import reading_records

EVAL_JSON = "eval-{split}.json"
CONFUSION_PNG = "confusion-{split}-{level}.png"


class EvaluateError(BadInput, RuntimeError):
    """Model and data that cannot be evaluated together (other classes, other patch shape, no labels)."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str                      # a run folder or a .keras file
    data: str
    split: Optional[str] = None     # None: 'test' when the data has it, else 'val'
    batch_size: int = 64
    top_k: int = 5
    out: Optional[str] = None       # where eval-SPLIT.json and the PNGs go; None: the run folder
    # Enhancement runs only: degradations (default: the run's own), their seed, and whether to run baselines.
    degrade: Tuple[str, ...] = ()
    seed: int = 0
    baselines: bool = True
    threshold: float = 0.5          # multi-label runs: the probability above which a class counts as predicted
    tta: bool = False               # average each patch over the run's --flip-labels flips (`artifacts.flip_averaged`)
    tta_flip_labels: Tuple[str, ...] = ()   # and over these (AXIS:A=B, as --flip-labels); implies tta

    def __post_init__(self):
        for name in ("batch_size", "top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Invalid value for argument `{name}`. Expected a strictly positive integer. "
                                 f"Received {name}={getattr(self, name)!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"Invalid value for argument `threshold`. Expected a probability in (0, 1). "
                             f"Received threshold={self.threshold!r}")


def classification_metrics(labels: np.ndarray, logits: np.ndarray, class_names: Sequence[str],
                           top_k: int = 5) -> dict:
    """Metrics of `logits [N, C]` (float) against `labels [N]` (int in [0, C)).

    `top_k` is clipped to `C - 1`. Precision of a class never predicted, and recall of a class absent from
    `labels`, are 0 (and the macro mean includes them): scikit-learn's `zero_division=0`.
    Top-k is counted here rather than with `sklearn.metrics.top_k_accuracy_score`, which ranks tied
    scores by class index, so the figure would depend on the order of the labels.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, np.int64)
    logits = np.asarray(logits, np.float64)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape != (len(labels), num_classes):
        raise ValueError(f"logits of shape {logits.shape} for {len(labels)} labels and {num_classes} classes")
    predicted = logits.argmax(axis=1)
    classes = np.arange(num_classes)
    if len(labels):
        confusion = confusion_matrix(labels, predicted, labels=classes)
        precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                   zero_division=0)
    else:  # scikit-learn refuses empty inputs; an empty split scores 0 everywhere
        confusion = np.zeros((num_classes, num_classes), np.int64)
        precision = recall = f1 = np.zeros(num_classes)
    true_pos = np.diag(confusion).astype(np.float64)
    actual_count = confusion.sum(axis=1)
    # Top-C accuracy is always 1, so k stops at C - 1 (and at 1 for two classes).
    k = max(1, min(top_k, num_classes - 1))
    # The true class is in the top k when fewer than k classes score strictly higher.
    true_score = logits[np.arange(len(labels)), labels]
    in_top_k = (logits > true_score[:, None]).sum(axis=1) < k
    count = max(len(labels), 1)
    return {
        "count": int(len(labels)),
        "accuracy": float(true_pos.sum() / count),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        f"top{k}": float(in_top_k.mean()) if len(labels) else 0.0,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(actual_count[i])} for i, name in enumerate(class_names)},
        "confusion": confusion.tolist(),
    }


def multilabel_metrics(targets: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                       threshold: float = 0.5) -> dict:
    """Metrics of `probabilities [N, C]` (float in [0, 1]) against multi-hot `targets [N, C]` (0 or 1).

    `map` is the mean of the classes' average precision (`sklearn.metrics.average_precision_score`) over
    the classes with at least one positive; a class without one has no AP (None) and is listed in
    `excluded_from_map`. Precision, recall and F1 count a class as predicted when its probability is >=
    `threshold` (scikit-learn, `zero_division=0`); `exact_match` is the share of items whose predicted set is
    exactly their set of classes.
    """
    from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_fscore_support

    targets = np.asarray(targets, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.shape != targets.shape or targets.ndim != 2 or targets.shape[1] != len(class_names):
        raise ValueError(f"probabilities {probabilities.shape} and targets {targets.shape} for "
                         f"{len(class_names)} classes")
    predicted = (probabilities >= threshold).astype(np.int64)
    positives = targets.sum(axis=0)
    ap = [float(average_precision_score(targets[:, c], probabilities[:, c])) if positives[c] else None
          for c in range(len(class_names))]
    scored = [v for v in ap if v is not None]
    if len(targets):
        precision, recall, f1, _ = precision_recall_fscore_support(targets, predicted, average=None, zero_division=0)
        micro = precision_recall_fscore_support(targets, predicted, average="micro", zero_division=0)[2]
    else:
        precision = recall = f1 = np.zeros(len(class_names))
        micro = 0.0
    return {
        "count": int(len(targets)),
        "map": float(np.mean(scored)) if scored else None,
        "excluded_from_map": [name for name, v in zip(class_names, ap) if v is None],
        "threshold": float(threshold),
        "precision": float(np.mean(precision)), "recall": float(np.mean(recall)), "f1": float(np.mean(f1)),
        "micro_f1": float(micro),
        "exact_match": float(accuracy_score(targets, predicted)) if len(targets) else 0.0,
        "per_class": {name: {"ap": ap[c], "precision": float(precision[c]), "recall": float(recall[c]),
                             "f1": float(f1[c]), "support": int(positives[c])}
                      for c, name in enumerate(class_names)},
    }


def regression_metrics(values: np.ndarray, predicted: np.ndarray, value_names: Sequence[str]) -> dict:
    """Metrics of `predicted [N, K]` against true `values [N, K]` (float), per value and their mean over values.

    MAE and RMSE (scikit-learn), SROCC (`scipy.stats.spearmanr`: ties take their mean rank) and PLCC
    (`scipy.stats.pearsonr`). A correlation is None where it is undefined: fewer than 2 items, or a
    constant column (true or predicted), which `undefined` names.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    values = np.asarray(values, np.float64)
    predicted = np.asarray(predicted, np.float64)
    if values.shape != predicted.shape or values.ndim != 2 or values.shape[1] != len(value_names):
        raise ValueError(f"predictions {predicted.shape} and values {values.shape} for {len(value_names)} values")
    per_value, undefined = {}, []
    for k, name in enumerate(value_names):
        y, p = values[:, k], predicted[:, k]
        m = {"mae": None, "rmse": None, "srocc": None, "plcc": None}
        if len(y):
            m["mae"] = float(mean_absolute_error(y, p))
            m["rmse"] = float(np.sqrt(mean_squared_error(y, p)))
        if len(y) >= 2 and np.ptp(y) > 0 and np.ptp(p) > 0:
            m["srocc"] = float(spearmanr(y, p).statistic)
            m["plcc"] = float(pearsonr(y, p).statistic)
        else:
            undefined.append(name)
        per_value[name] = m

    def mean(key):
        got = [m[key] for m in per_value.values() if m[key] is not None]
        return float(np.mean(got)) if got else None

    return {"count": int(len(values)), **{key: mean(key) for key in ("mae", "rmse", "srocc", "plcc")},
            "per_value": per_value, "undefined_correlations": undefined}


def video_level(video_ids: np.ndarray, labels: np.ndarray,
                logits: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch arrays -> (ids [V], labels [V], mean logits [V, C]), videos in first-seen order.

    `labels` may also be rows (`[N, C]` multi-hot targets, `[N, K]` values), each the same for all patches
    of a video; `logits` any per-patch outputs to average (probabilities, values)."""
    ids, first, inverse = np.unique(video_ids, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(ids), logits.shape[1]), np.float64)
    np.add.at(sums, inverse, logits)
    counts = np.bincount(inverse, minlength=len(ids))
    video_labels = labels[first]
    mixed = [ids[v] for v in range(len(ids)) if np.any(labels[inverse == v] != video_labels[v])]
    if mixed:
        raise EvaluateError(f"videos {mixed[:5]} have patches with different labels")
    order = np.argsort(first)
    return ids[order], video_labels[order], (sums / counts[:, None])[order]


def predict(model, dataset, target: Optional[str] = None, sigmoid: bool = False) -> Dict[str, np.ndarray]:
    """Runs `model` over a feature-dict dataset; returns its outputs ("logits", or their sigmoid), the
    records' labels (or their `target` feature, e.g. `schema.VALUES`) and video ids, in order."""
    import tensorflow as tf

    from tfrecords_tools import schema

    target = target or schema.LABEL

    @tf.function(reduce_retracing=True)
    def forward(patch):
        out = model(patch, training=False)
        return tf.sigmoid(tf.cast(out, tf.float32)) if sigmoid else out

    logits, labels, ids = [], [], []
    for features in dataset:
        logits.append(forward(features[schema.PATCH]).numpy())
        labels.append(features[target].numpy())
        ids.append(features[schema.VIDEO_ID].numpy())
    if not logits:
        return {"logits": np.zeros((0, model.output_shape[-1])), "labels": np.zeros(0, np.int64),
                "video_ids": np.zeros(0, object)}
    return {"logits": np.concatenate(logits).astype(np.float64), "labels": np.concatenate(labels),
            "video_ids": np.concatenate(ids)}


def evaluate(config: EvalConfig) -> dict:
    """Evaluates `config.model` on a split of `config.data`; writes eval-SPLIT.json and confusion PNGs.

    Holds `config.data` for reading (`outputs.reading`): a folder being written raises `OutputBusyError`.
    A record that fails to read raises `verify.DamagedRecords`, naming the shard.
    Every file is written under a temporary name and renamed when complete.
    """
    with outputs.reading(config.data), reading_records(config.data):
        return _evaluate(config)


def _evaluate(config: EvalConfig) -> dict:
    from stpkeras import pipeline
    from stpkeras.figures import draw_confusion
    info = pipeline.load_info(config.data)
    # A .keras file away from its run folder is taken to be of the data's classes and patches.
    lone = {} if artifacts.run_of(config.model) else {"labels": info.labels, "spec": info.spec}
    artifact = artifacts.load(config.model, compile=True, **lone)
    if config.tta or config.tta_flip_labels:
        artifact = artifacts.flip_averaged(artifact, config.tta_flip_labels)
    # An export is measured through its serving signature, as TF Serving would run it; its folder, which a
    # server may be loading, is not written into.
    if artifact.form == "saved_model" and config.out is None:
        raise EvaluateError(f"{config.model}: an export; pass --out for the evaluation's files (an export's "
                            "folder is not written into)")
    artifact = dataclasses.replace(artifact, model=artifacts.keras_model(artifact))
    model = artifact.model
    spec = artifact.spec if artifact.run is not None else None
    if artifact.task == "enhance":   # a run's, or a lone .keras file's whose output layer is 'pixels'
        return evaluate_enhance(config, artifact, info)
    if artifact.task == "regress" or artifact.multi_label:
        return evaluate_targets(config, artifact, info)
    _require_patch_shape(config, model, info)
    labels = tuple(artifact.labels or info.labels)
    if tuple(info.labels) != labels:
        raise EvaluateError(f"{config.data}: classes {list(info.labels)} differ from the model's {list(labels)}")
    if model.output_shape[-1] != len(labels):
        raise EvaluateError(f"{config.model}: {model.output_shape[-1]} outputs for {len(labels)} classes "
                            f"{list(labels)}")
    split = _split_to_evaluate(config, info)
    dataset = pipeline.make_dataset(info, split, batch_size=config.batch_size, training=False,
                                    as_supervised=False, spec=spec)
    out = predict(model, dataset)
    known = out["labels"] >= 0
    unlabelled = int((~known).sum())
    if not known.any():
        raise EvaluateError(f"{config.data}: split {split!r} has no labelled patches")
    logits, y, ids = out["logits"][known], out["labels"][known].astype(np.int64), out["video_ids"][known]
    result = {"model": config.model, "data": config.data, "split": split, "labels": list(labels),
              "unlabelled_patches": unlabelled, "tta": bool(artifact.tta),
              "tta_flip_labels": list(config.tta_flip_labels), "tta_flips": list(artifact.tta),
              "patch": classification_metrics(y, logits, labels, config.top_k)}
    _, video_labels, video_logits = video_level(ids, y, logits)
    result["video"] = classification_metrics(video_labels, video_logits, labels, config.top_k)

    out_dir = _out_dir(config)
    for level in ("patch", "video"):
        path = os.path.join(out_dir, CONFUSION_PNG.format(split=split, level=level))
        draw_confusion(np.array(result[level]["confusion"]), labels, path, title=f"{split}, {level} level")
        result[level]["confusion_png"] = path
    result["json"] = os.path.join(out_dir, EVAL_JSON.format(split=split))
    outputs.write_text(result["json"], json.dumps(result, indent=1) + "\n")
    return result


def _split_to_evaluate(config: EvalConfig, info) -> str:
    split = config.split or next((s for s in ("test", "val") if s in info.splits), None)
    if split is None:
        raise EvaluateError(f"{config.data}: no 'test' or 'val' split; pass --split (available: {list(info.splits)})")
    info.resolve(split)
    return split


def _out_dir(config: EvalConfig) -> str:
    """`--out`, else the run folder (or the `.keras` file's folder); made if missing."""
    out_dir = config.out or (config.model if os.path.isdir(config.model)
                             else os.path.dirname(os.path.abspath(config.model)))
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


# --- multi-label classification and regression ------------------------------------------------

def _require_patch_shape(config: EvalConfig, model, info) -> None:
    """The model takes the data's patches (`artifacts.takes`: equal axes, or open ones), or the reason it does not."""
    if not artifacts.takes(model.input_shape[1:], info.spec.shape):
        raise EvaluateError(f"{config.data}: patches are {info.spec.shape}, the model {config.model} takes "
                            f"{tuple(model.input_shape[1:])} (T, H, W, C)")


def evaluate_targets(config: EvalConfig, artifact, info) -> dict:
    """A multi-label classifier (`multilabel_metrics` at `config.threshold`) or a regressor
    (`regression_metrics`) on a split, per patch and per video (the mean of its patches' probabilities
    or values); writes eval-SPLIT.json and returns the same dict."""
    from stpkeras import pipeline
    from tfrecords_tools import schema

    model, names = artifact.model, tuple(artifact.labels)
    regress = artifact.task == "regress"
    key, expected, what = ((schema.VALUES, info.value_names, "values") if regress
                           else (schema.MULTI_HOT, info.labels, "classes"))
    _require_patch_shape(config, model, info)
    if tuple(expected) != names:
        raise EvaluateError(f"{config.data}: {what} {list(expected)} differ from the model's {list(names)}")
    if key not in info.target_spec():
        raise EvaluateError(f"{config.data}: the records carry no {key!r} to measure the model against "
                            f"(label_mode {info.label_mode!r}, value_names {list(info.value_names)})")
    split = _split_to_evaluate(config, info)
    dataset = pipeline.make_dataset(info, split, batch_size=config.batch_size, training=False,
                                    as_supervised=False, spec=artifact.spec)
    # The multi-label metrics take probabilities: the sigmoid of the logits.
    out = predict(model, dataset, target=key, sigmoid=not regress)
    if not len(out["labels"]):
        raise EvaluateError(f"{config.data}: split {split!r} is empty")
    _, video_targets, video_outputs = video_level(out["video_ids"], out["labels"], out["logits"])
    if regress:
        def measure(targets, outputs):
            return regression_metrics(targets, outputs, names)
    else:
        def measure(targets, outputs):
            return multilabel_metrics(targets, outputs, names, config.threshold)
    result = {"task": artifact.task, "multi_label": not regress, "model": config.model, "data": config.data,
              "split": split, "labels": list(names),
              "patch": measure(out["labels"], out["logits"]), "video": measure(video_targets, video_outputs)}
    result["json"] = os.path.join(_out_dir(config), EVAL_JSON.format(split=split))
    outputs.write_text(result["json"], json.dumps(result, indent=1) + "\n")
    return result


# --- enhancement ------------------------------------------------------------------------------

# Patches on which each baseline's parameter is chosen (see stpkeras.baselines): every k-th patch of the
# split, so every video of it has a say (the first 64 patches came from one video: a Gaussian sigma tuned
# there, 2.8, scored 26.56 dB on the benchmark's split; sigma 1.7 scored 28.76). 256: on 64 of the 6,424
# animation test patches blurred at sigma 1.5 Wiener's two parameters came out (1.25, 0.03), 42.08 dB on the
# split, where 128 and 256 patches choose (1.5, 0.003), 43.25 dB (issue 20, docs/benchmarks.md). Tuning Wiener
# on 256 patches of 8x64x64 costs about 2 CPU minutes.
TUNE_PATCHES = 256


def spread_sample(dataset, records: int, count: int):
    """`count` (input, target) patches of a batched `dataset` of `records` patches, every k-th of them so that
    each video of the split has a say, as numpy arrays; None when it is empty."""
    from stpkeras import pipeline

    sample = next(iter(pipeline.spread(dataset, records, count, count)), None)
    return None if sample is None else (sample[0].numpy(), sample[1].numpy())


def evaluate_enhance(config: EvalConfig, artifact, info) -> dict:
    """PSNR/SSIM per patch on a held-out split: the degraded input, the classical baselines (denoisers; for blur,
    sharpeners: `baselines.for_degradations`) and the model.

    The split's clean patches are degraded as in training (`run.json`'s
    degradations unless `config.degrade` says otherwise) with a fixed seed, so
    every evaluation sees the same inputs; paired data uses its targets.
    Writes `eval-SPLIT.json`; returns the same dict.
    """
    import tensorflow as tf

    from stpkeras import baselines as baselines_lib
    from stpkeras import pipeline
    from stpkeras.degrade import describe, make_pairs, parse_degrade
    from stpkeras.quality import psnr, ssim

    model, train_config = artifact.model, artifact.train_config
    _require_patch_shape(config, model, info)
    degrade = describe(parse_degrade(config.degrade or (train_config.get("task_options") or {}).get("degrade")))
    paired = bool(info.manifest.get("paired"))
    if not degrade and not paired:
        raise EvaluateError(f"{config.data}: no degradations (the run has none; pass --degrade) and no paired targets")
    split = _split_to_evaluate(config, info)
    element = make_pairs(info.encoding, info.spec, paired=paired, degradations=degrade)
    dataset = pipeline.make_dataset(info, split, batch_size=config.batch_size, training=False, element_fn=element,
                                    seed=config.seed, deterministic=True)
    forward = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)
    kinds = () if paired else tuple(d.kind for d in parse_degrade(degrade))
    methods = baselines_lib.for_degradations(kinds) if config.baselines else {}

    # The baselines' parameters are chosen on TUNE_PATCHES patches spread evenly over the split (a pass that
    # reads and degrades, nothing more; each patch with the degradation it has in the measuring pass).
    tune = spread_sample(dataset, info.num_records(split), TUNE_PATCHES)
    if tune is None:
        raise EvaluateError(f"{config.data}: split {split!r} is empty")
    tune_x, tune_y = tune
    chosen = {name: baselines_lib.tune(name, tune_x, tune_y) for name in methods}

    sums: Dict[str, np.ndarray] = {}
    count = 0

    def measure(name, pred, clean):
        total = sums.setdefault(name, np.zeros(2))
        total += (float(np.sum(psnr(pred, clean))), float(np.sum(ssim(pred, clean))))

    def batches():
        for x, y in dataset:
            yield x.numpy(), y.numpy()

    for x, y in batches():
        count += len(x)
        measure("input", x, y)
        measure("model", forward(x).numpy(), y)
        for name, fn in methods.items():
            measure(name, fn(x, chosen[name]), y)
    scores = {name: {"psnr": float(v[0] / count), "ssim": float(v[1] / count)} for name, v in sums.items()}
    result = {"task": "enhance", "model": config.model, "data": config.data, "split": split, "patches": count,
              "degrade": list(degrade), "paired": paired, "seed": config.seed, "tta": bool(artifact.tta),
              "input": scores["input"], "output": scores["model"],
              "baselines": {name: {**scores[name], "param": chosen[name]} for name in methods}}
    left_out = baselines_lib.missing(kinds) if config.baselines else {}
    if left_out:
        result["baselines_missing"] = left_out
    best = max(methods, key=lambda n: scores[n]["psnr"]) if methods else None
    result["best_baseline"] = best
    result["gain_db"] = {"over_input": scores["model"]["psnr"] - scores["input"]["psnr"],
                         "over_best_baseline": (scores["model"]["psnr"] - scores[best]["psnr"]) if best else None}
    result["json"] = os.path.join(_out_dir(config), EVAL_JSON.format(split=split))
    outputs.write_text(result["json"], json.dumps(result, indent=1) + "\n")
    return result
