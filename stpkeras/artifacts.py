"""Artifact stage: the files of a trained model, and one door to every form of it (like `keras.saving.load_model`).

A trained model comes in three forms, and `load(path)` takes any of them:

- a **run folder**, written by `stp train`:

      run.json      task, model, config, spec, labels, data path, manifest sha256, versions, metrics, status
      best.keras    the model of the best epoch (by the task's monitor, on validation when there is one)
      last.keras    the model after the last finished epoch
      history.csv   one row per epoch (Keras CSVLogger)
      logs/         TensorBoard
      curves.png    loss and metrics per epoch
      backup/       `keras.callbacks.BackupAndRestore` state while a run is unfinished

- a **`.keras` file**, with its labels and spec from the `run.json` beside it (or passed in);
- an **export**, written by `stp export`: `saved_models/NAME/VERSION/` (or `saved_models/NAME`, its newest
  version), a SavedModel with `assets/labels.txt`, `assets/patch_spec.json` and
  `assets.extra/stpkeras_export.json`.

It returns one `Artifact`: the callable model (a `keras.Model`, or the loaded SavedModel), its task,
labels, `PatchSpec` and signatures. Every command and stage loads through it; this module is the only
one that knows these file names. The package's Keras objects are registered by `stpkeras.saving`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from tfrecords_tools.errors import BadInput
from tfrecords_tools.spec import PatchSpec

# The run folder.
RUN_JSON = "run.json"
BEST, LAST = "best.keras", "last.keras"
HISTORY, LOGS, CURVES, BACKUP = "history.csv", "logs", "curves.png", "backup"
RUN_FILES = (RUN_JSON, HISTORY, BEST, LAST, BACKUP)   # any of these means a run was started there
# The export folder.
SAVED_MODEL = "saved_model.pb"
LABELS_ASSET = "labels.txt"
SPEC_ASSET = "patch_spec.json"
INFO_FILE = os.path.join("assets.extra", "stpkeras_export.json")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")

TASKS_WITHOUT_LABELS = ("enhance", "embed", "pretrain", "stabilize")


class ArtifactError(BadInput):
    """A path that is not a loadable model in any of the three forms; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A trained model and what it was trained for.

    `model` is a `keras.Model` (form "keras": `uint8 [batch, *spec.shape]` in, the task's output out)
    or the object `tf.saved_model.load` returns (form "saved_model": call its `signatures`).
    """

    path: str                    # the .keras file, or the SavedModel's version folder
    form: str                    # "keras" or "saved_model"
    task: str                    # classify, regress, enhance, embed, segment
    labels: Tuple[str, ...]      # the classes the model predicts (regress: its values' names); () for enhance, embed
    spec: PatchSpec
    model: object
    run: Optional[dict] = None   # run.json (a run's model), or the export's stpkeras_export.json
    tta: Tuple[str, ...] = ()    # the flips `model` averages over (`flip_averaged`); () for one pass

    @property
    def run_dir(self) -> Optional[str]:
        """The run folder the model belongs to (None for an export or a lone .keras file)."""
        return os.path.dirname(self.path) if self.form == "keras" and self.run is not None else None

    @property
    def task_options(self) -> dict:
        """The task's options and what it took from the data (run.json's or the export's `task_options`,
        e.g. `multi_label`); {} for a lone `.keras` file and runs from before they were recorded."""
        return dict((self.run or {}).get("task_options") or {})

    @property
    def train_config(self) -> dict:
        """The `stp train` config of the run the model came from (run.json's `config`; an export keeps its run's
        in its `run`); {} for a lone `.keras` file."""
        run = self.run or {}
        return dict((run.get("run") or {} if self.form == "saved_model" else run).get("config") or {})

    @property
    def multi_label(self) -> bool:
        """A classifier with sigmoid outputs, one probability per class (`stp train --multi-label`)."""
        return self.task == "classify" and bool(self.task_options.get("multi_label"))

    @property
    def signatures(self) -> Tuple[str, ...]:
        return tuple(self.model.signatures) if self.form == "saved_model" else ()


def flip_averaged(artifact: Artifact, more_flips: Sequence[str] = ()) -> Artifact:
    """`artifact` whose model averages each patch over flips, for `--tta` (test-time augmentation, 2^k passes
    for k flipped axes). A classifier's logits over the flips of its run's `--flip-labels` and `more_flips`
    (`--tta-flip-labels`: symmetries of the task the run did not train with, e.g. time reversal for camera
    motion; those the run recorded, `stp train --tta-flip-labels`, come with it), each flip's put back in the
    clip's own classes (`augment.flip_averaged`); an enhancer's pixels
    over the left-right, top-bottom and time flips (8 passes), each output flipped back
    (`augment.flip_averaged_pixels`)."""
    from stpkeras import augment

    if artifact.tta:
        raise ArtifactError(f"{artifact.path}: already averaged over the flips {list(artifact.tta)}")
    if artifact.form == "keras" and artifact.task == "enhance" and not more_flips:
        return dataclasses.replace(artifact, model=augment.flip_averaged_pixels(artifact.model),
                                   tta=augment.ENHANCE_TTA_AXES)
    options = artifact.task_options
    own = tuple(options.get("flip_labels") or ()) + tuple(options.get("tta_flip_labels") or ())
    flips = tuple(dict.fromkeys(own + tuple(more_flips)))
    if artifact.form != "keras" or artifact.task != "classify" or artifact.multi_label or not flips:
        raise ArtifactError(f"{artifact.path}: --tta averages an enhancer over flips, or a classifier over the flips "
                            "its run trained with (`stp train --flip-labels`) or that --tta-flip-labels names; "
                            "expected a run or .keras file of an enhancer (without --tta-flip-labels) or of a "
                            "single-label classifier with such flips. Received a "
                            f"{artifact.form} model of task {artifact.task!r} with flip_labels={list(own)}"
                            + (f" and --tta-flip-labels {list(more_flips)}" if more_flips else ""))
    try:
        permutations = augment.parse_flip_labels(flips, artifact.labels)
        averaged = augment.flip_averaged(artifact.model, permutations, artifact.spec.pixels)
    except ValueError as e:
        raise ArtifactError(f"{artifact.path}: {e}") from None
    return dataclasses.replace(artifact, model=averaged, tta=flips)


def keras_model(artifact: Artifact):
    """`artifact`'s model as a `keras.Model` from uint8 patches to the task's output: a Keras model as it is; an
    export's `serving_default` through `keras.layers.TFSMLayer` (its `logits`, `values` or `pixels_float`), so
    that a stage written for Keras models (`stp evaluate`) measures an export as TF Serving runs it, flips and
    deblocking stage included."""
    if artifact.form == "keras":
        return artifact.model
    import keras

    from stpkeras.signatures import LOGITS, PIXELS_FLOAT, SERVING_DEFAULT, VALUES

    key = {"classify": LOGITS, "regress": VALUES, "enhance": PIXELS_FLOAT}.get(artifact.task)
    outputs = artifact.model.signatures[SERVING_DEFAULT].structured_outputs if SERVING_DEFAULT in \
        artifact.signatures else {}
    if key not in outputs:
        raise ArtifactError(f"{artifact.path}: expected an export of a classifier, regressor or enhancer whose "
                            f"{SERVING_DEFAULT} returns {key or 'logits, values or pixels_float'!r}; received one of "
                            f"task {artifact.task!r} with signatures {list(artifact.signatures)}")
    inputs = keras.Input(artifact.spec.shape, dtype="uint8", name="patches")
    served = keras.layers.TFSMLayer(artifact.path, call_endpoint=SERVING_DEFAULT, name="served")(inputs)
    return keras.Model(inputs, served[key], name=f"{os.path.basename(os.path.dirname(artifact.path))}_served")


def tta_passes(flips: Sequence[str]) -> int:
    """How many passes of the model averaging over `flips` costs (`Artifact.tta`): 2^k for k flipped axes."""
    return 2 ** len({f.split(":", 1)[0] for f in flips})


# --- reading the files --------------------------------------------------------------------------

def takes(shape, spec_shape) -> bool:
    """Whether a model input (or output) of `shape` (`[T, H, W, C]`, batch axis off) takes patches of `spec_shape`:
    every axis equal, or left open (None: a fully convolutional enhancer takes any frame size)."""
    shape, spec_shape = tuple(shape), tuple(spec_shape)
    return len(shape) == len(spec_shape) and all(a is None or a == b for a, b in zip(shape, spec_shape))


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read JSON ({e})") from e


def write_json(path: str, data: dict) -> None:
    """Writes `data` under a temporary name beside `path`, then renames: a reader sees the old or the new file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_run(run_dir: str) -> dict:
    """`RUN_DIR/run.json`, checked for the keys every reader needs."""
    path = os.path.join(run_dir, RUN_JSON)
    run = read_json(path)
    missing = [k for k in ("spec", "labels") if k not in run]
    if missing:
        raise ArtifactError(f"{path}: lacks {missing}; expected a run folder written by `stp train`")
    return run


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in (RUN_JSON, BEST, LAST))


def run_of(path: str) -> Optional[str]:
    """The run folder `path` belongs to (a run folder, or the folder of a `.keras` file with a `run.json`
    beside it), or None (an export, or a lone `.keras` file)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return folder if os.path.isfile(os.path.join(folder, RUN_JSON)) else None


def run_model_path(run_dir: str) -> str:
    """`best.keras`, else `last.keras` (a run killed before its first validation) of a run folder."""
    for name in (BEST, LAST):
        if os.path.isfile(os.path.join(run_dir, name)):
            return os.path.join(run_dir, name)
    raise ArtifactError(f"{run_dir}: no {BEST} or {LAST}; expected a run folder written by `stp train` "
                        "(or a .keras file, or an export)")


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


def versions(model_root: str) -> List[int]:
    """Integer version folders under `saved_models/NAME` (local, gs:// ...), ascending (what TF Serving would load)."""
    from tfrecords_tools.storage import is_remote

    if not is_remote(model_root):
        if not os.path.isdir(model_root):
            return []
        return sorted(int(n) for n in os.listdir(model_root)
                      if n.isdigit() and os.path.isdir(os.path.join(model_root, n)))
    import tensorflow as tf

    if not tf.io.gfile.isdir(model_root):
        return []
    return sorted(int(n.rstrip("/")) for n in tf.io.gfile.listdir(model_root) if n.rstrip("/").isdigit())


def resolve_saved_model(path: str) -> str:
    """A SavedModel folder, or `saved_models/NAME` (its newest version) -> the version folder."""
    if os.path.isfile(os.path.join(path, SAVED_MODEL)):
        return path
    found = versions(path)
    if found:
        return os.path.join(path, str(found[-1]))
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such SavedModel folder, run folder or .keras file")
    raise ArtifactError(f"{path}: expected a run folder (run.json, best.keras), a .keras file or an export "
                        f"(a SavedModel folder with {SAVED_MODEL}, or saved_models/NAME holding integer versions)")


def read_assets(saved_model_dir: str, *, labels: bool = True) -> Tuple[Tuple[str, ...], PatchSpec]:
    """Labels and `PatchSpec` stored in an export's assets (`labels=False`: a model without classes, no labels)."""
    labels_path = os.path.join(saved_model_dir, "assets", LABELS_ASSET)
    spec_path = os.path.join(saved_model_dir, "assets", SPEC_ASSET)
    names: Tuple[str, ...] = ()
    try:
        if labels:
            with open(labels_path, encoding="utf-8") as f:
                names = tuple(line.rstrip("\n") for line in f)
    except OSError as e:
        raise ArtifactError(f"{saved_model_dir}: no label asset ({e}); expected an export written by `stp export`") \
            from e
    try:
        spec = PatchSpec.from_dict(read_json(spec_path))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{spec_path}: bad PatchSpec ({e})") from e
    return names, spec


def check_labels(labels: Sequence[str], where: str) -> Tuple[str, ...]:
    labels = tuple(str(v) for v in labels)
    if not labels:
        raise ArtifactError(f"{where}: the label list is empty; a classifier needs at least one class name")
    bad = [v for v in labels if not v or "\n" in v or "\r" in v]
    if bad:
        raise ArtifactError(f"{where}: class names must be non-empty single lines. Received {bad!r}")
    if len(set(labels)) != len(labels):
        raise ArtifactError(f"{where}: class names repeat: {sorted(v for v in set(labels) if labels.count(v) > 1)}")
    return labels


# --- the one door ---------------------------------------------------------------------------------

def load_keras_model(path: str, *, compile: bool = False):
    """A `.keras` file -> `keras.Model` (for inference unless `compile`), every stpkeras object known, computing
    in float32 (`float32_model`) whatever precision it trained in."""
    import keras  # importing it registers the package's Keras objects (stpkeras.saving)

    try:
        return float32_model(keras.saving.load_model(path, compile=compile))
    except Exception as e:  # Keras raises ValueError, OSError, zipfile errors, TypeError ...
        raise ArtifactError(f"{path}: not a loadable Keras model ({type(e).__name__}: {e})") from e


def float32_model(model):
    """A model built under a mixed-precision policy -> the same model and weights computing in float32 (compiled
    again as it was, if it was); any other model as it is.

    Mixed precision is how a run trains (`setup.mixed_policy`: bfloat16 by default on a CPU that computes it
    natively), not what its outputs are: a loaded model predicts, evaluates and exports in float32, so results
    do not depend on the machine that trained it, a SavedModel runs on any CPU or GPU, and every loader of one
    run (Keras, SavedModel, a fresh process) gives the same numbers."""
    import keras

    def to_float32(config):
        if isinstance(config, dict):
            if config.get("class_name") == "DTypePolicy" and str(config.get("config", {}).get("name", "")).startswith(
                    "mixed_"):
                return {**config, "config": {**config["config"], "name": "float32"}}
            return {key: to_float32(value) for key, value in config.items()}
        if isinstance(config, list):
            return [to_float32(value) for value in config]
        return config

    config = keras.saving.serialize_keras_object(model)
    float32 = to_float32(config)
    if float32 == config:   # no layer under a mixed policy
        return model
    rebuilt = keras.saving.deserialize_keras_object(float32)
    rebuilt.set_weights(model.get_weights())
    if model.compiled:
        rebuilt.compile_from_config(to_float32(model.get_compile_config()))
    return rebuilt


def load(path, *, labels: Optional[Sequence[str]] = None, spec: Optional[PatchSpec] = None,
         task: Optional[str] = None, compile: bool = False) -> Artifact:
    """A run folder, a `.keras` file or an export (`saved_models/NAME[/VERSION]`) -> its `Artifact`.

    Labels, spec and task come from the run's `run.json` (beside a `.keras` file too) or the export's
    assets; `labels=` and `spec=` fill them in for a lone `.keras` file and win over stored ones, and
    `task=` names a lone file's task (default: enhance for a model whose output layer is 'pixels', else
    classify). `compile=True` also restores a `.keras`
    model's optimizer, loss and metrics (to go on training or evaluate it).
    """
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, SAVED_MODEL)) and is_run_dir(path):
        return _load_keras(run_model_path(path), read_run(path), labels, spec, task, compile)
    if path.endswith(".keras") or os.path.isfile(path):
        if not os.path.isfile(path):
            raise ArtifactError(f"{path}: no such file")
        if not path.endswith(".keras"):
            raise ArtifactError(f"{path}: expected a run folder, a .keras file or an export")
        run_dir = run_of(path)
        return _load_keras(path, read_run(run_dir) if run_dir else None, labels, spec, task, compile)
    return _load_export(resolve_saved_model(path))


def _load_keras(path: str, run: Optional[dict], labels, spec, task: Optional[str], compile: bool) -> Artifact:
    model = None
    if run is not None:
        task = run.get("task", "classify")
    elif task is None:
        # A lone file: an enhancer says what it is by its output layer, 'pixels' (`layers.enhance_output`).
        model = load_keras_model(path, compile=compile)
        task = "enhance" if model.output_names == ["pixels"] else "classify"
    if spec is None and run is not None:
        try:
            spec = PatchSpec.from_dict(run["spec"])
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: run.json holds a bad spec: {e}") from e
    if labels is None and run is not None:
        labels = run["labels"]
    if spec is None or (labels is None and task not in TASKS_WITHOUT_LABELS):
        lacking = " and ".join(n for n, v in (("labels", labels), ("PatchSpec", spec)) if v is None)
        raise ArtifactError(f"{path}: no run.json beside it, so its {lacking} are unknown. Pass them (`stp export "
                            "--data DATASET_DIR` reads both from the dataset.json of the converted data), or load "
                            "its run folder or export")
    labels = () if task in TASKS_WITHOUT_LABELS else check_labels(labels, path)
    return Artifact(path, "keras", task, labels, spec, model or load_keras_model(path, compile=compile), run)


def _load_export(version_dir: str) -> Artifact:
    import tensorflow as tf

    info_path = os.path.join(version_dir, INFO_FILE)
    info = read_json(info_path) if os.path.isfile(info_path) else None
    task = (info or {}).get("task", "classify")
    labels, spec = read_assets(version_dir, labels=task not in TASKS_WITHOUT_LABELS)
    try:
        loaded = tf.saved_model.load(version_dir, tags=["serve"])
    except Exception as e:  # TF raises OSError, DecodeError, NotFoundError, ValueError ... for a bad folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ArtifactError(f"{version_dir}: not a loadable SavedModel ({type(e).__name__}: {first}). "
                            "Export it again with `stp export`") from e
    tta = tuple(((info or {}).get("tta") or {}).get("flips") or ())   # `stp export --tta`: baked in
    return Artifact(version_dir, "saved_model", task, labels, spec, loaded, info, tta)
