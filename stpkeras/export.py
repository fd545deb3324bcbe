"""Export stage: a trained classifier or enhancer -> `saved_models/NAME/VERSION/`, the layout TF Serving watches.

One export holds three signatures, written with `keras.export.ExportArchive`
and explicit input signatures (batch dimension `None`):

- `serving_default`: `patches`, `uint8 [batch, T, H, W, 3]` raw pixels -> `logits` float32 [batch, K],
  `probabilities` float32 [batch, K], `class_ids` int64 [batch], `class_names` string [batch];
- `serve_examples`: `examples`, string [batch], serialized `tf.train.Example`s in the patch record
  schema (`tfrecords_tools.schema`), any encoding -> the same four;
- `embeddings`: `patches` as above -> `embeddings` float32 [batch, D], the model's layer named
  `features` (only when the model has one).

With `streaming=True` (`stp export --streaming`, a causal classifier: `stp train --causal`) two more:

- `stream`: `frames` uint8 [batch, n, H, W, C] (n >= 1 new frames per stream) and the stream state
  `state_*` float32 -> `logits`, `probabilities` [batch, n, K], `class_ids`, `class_names` [batch, n] (the
  answer at each new frame: the model's clip answer over the last T frames, where T is the spec's
  frames) and the new `state_*`. The state is each causal convolution's last k-1 input frames and the
  head's last T-1 frame features with a frame count (`stpkeras.models.causal`): a server keeps
  nothing between calls, the client carries it.
- `init_state`: `streams` int32 [batch] (one entry per stream) -> the zero state of `batch` streams.

Normalisation (uint8 -> float) is the model's own first layer, so a client
sends raw pixels and the server computes exactly what training computed.

A multi-label classifier's `serving_default` and `serve_examples` return `logits` and `probabilities`
(sigmoid: one independent probability per class), float32 [batch, C]; a regressor's (`--task regress`)
return `values` float32 [batch, K] in the data's units and `value_names` string [batch, K]
(`assets/labels.txt` holds the value names, one a line).

An enhancement run (`--task enhance`) exports `serving_default` and
`serve_examples` with other outputs: `pixels` uint8 [batch, T, H, W, 3] (the
enhanced patches, clipped and rounded) and `pixels_float` float32 (0-255
units, unclipped); it has no labels asset and no `embeddings`.

Beside the graph:

- `assets/labels.txt`: the class names, one a line (line i = class id i). It
  is a real SavedModel asset: the `class_names` lookup table reads it, so it
  moves with the model and the loader rewrites its path.
- `assets/patch_spec.json`: the `PatchSpec` that cut the training patches; a
  client cuts its videos with it (`stp predict` does).
- `assets.extra/tf_serving_warmup_requests`: `PredictionLog` records that TF
  Serving replays before it marks the version available.
- `assets.extra/stpkeras_export.json`: where the export came from (run,
  versions of TF and Keras, signatures).

A version is written under a temporary name that is not an integer (TF
Serving ignores those) and renamed when complete, so a server watching the
folder never loads half a model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from stpkeras import artifacts
from stpkeras.artifacts import (INFO_FILE, LABELS_ASSET, SPEC_ASSET, WARMUP_FILE, Artifact, ArtifactError,
                                versions)
from tfrecords_tools import outputs
from tfrecords_tools import schema as record_schema
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.storage import check_path, is_remote, join

from stpkeras.signatures import (CLASS_IDS, CLASS_NAMES, EMBEDDINGS, EXAMPLES, FEATURES_LAYER, FRAMES,  # noqa: F401
                                 INIT_STATE, LOGITS, LOGITS_LAYER, PATCHES, PIXELS, PIXELS_FLOAT, PROBABILITIES,
                                 SERVE_EXAMPLES, SERVING_DEFAULT, STREAM, STREAM_SIGNATURES, STREAMS, VALUE_NAMES,
                                 VALUES, VALUES_LAYER)

# TF Serving takes model names from folder names and URLs; keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WARMUP_BATCH_SIZES = (1, 8)


# Reading or writing a model artifact fails with one error type: an export's own refusals (a taken
# version, a bad name) and the loader's (`stpkeras.artifacts`) alike.
ExportError = ArtifactError


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: str
    name: str
    version: int
    signatures: Tuple[str, ...]
    labels: Tuple[str, ...]
    spec: PatchSpec
    warmup_records: int
    tta: Tuple[str, ...] = ()   # the flips its answers average over (`--tta`); () for one pass


# --- reading the input ------------------------------------------------------------------------


def resolve_source(model_or_run: str, labels: Optional[Sequence[str]] = None,
                   spec: Optional[PatchSpec] = None) -> Artifact:
    """The model behind `model_or_run` (a run folder or a `.keras` file; see `stpkeras.artifacts.load`),
    checked for what an export needs: a classifier with its labels, or an enhancement model."""
    source = artifacts.load(model_or_run, labels=labels, spec=spec)
    if source.form != "keras":
        raise ExportError(f"{source.path}: already an export; expected a run folder or a .keras file")
    if source.task == "enhance":
        shapes = [tuple(t.shape) for t in source.model.inputs + source.model.outputs]
        if len(shapes) != 2 or not all(artifacts.takes(s[1:], source.spec.shape) for s in shapes):
            raise ExportError(f"{source.path}: expected an enhancement model uint8 "
                              f"[None, {', '.join(map(str, source.spec.shape))}] -> pixels of the same shape; "
                              f"it maps {shapes}")
        return source
    if source.task == "stabilize":
        raise ExportError(f"{source.path}: a motion model (task stabilize); export writes classifiers, regressors "
                          "and enhancement models. A motion model is not served patch by patch: `stp stabilize "
                          "RUN VIDEO --out OUT.mp4` runs it over a whole video (windows of downscaled frames, "
                          "then a path smoothed over all of them) and takes this run folder or its .keras file")
    if source.task not in ("classify", "regress"):
        raise ExportError(f"{source.path}: the run's task is {source.task!r}; export writes classifiers "
                          "(task classify), regressors (task regress) and enhancement models (task enhance)")
    check_model(source.model, source.spec, len(source.labels), source.path,
                VALUES_LAYER if source.task == "regress" else LOGITS_LAYER)
    return source


def check_model(model, spec: PatchSpec, num_classes: int, where: str, output_layer: str = LOGITS_LAYER) -> None:
    """Checks the model contract: uint8 [None, T, H, W, 3] in, a layer `logits` (a regressor's: `values`)
    with K units out."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise ExportError(f"{where}: expected a model with one input, it has {len(inputs)}")
    shape = tuple(inputs[0].shape)
    dtype = str(inputs[0].dtype)
    if dtype != "uint8" or shape[1:] != spec.shape:
        raise ExportError(f"{where}: the model takes {dtype} {list(shape)}, expected uint8 "
                          f"[None, {', '.join(map(str, spec.shape))}] (the PatchSpec's patch shape)")
    try:
        logits = model.get_layer(output_layer)
    except ValueError as e:
        raise ExportError(f"{where}: the model has no layer named {output_layer!r} (its output layer)") from e
    out = tuple(model.outputs[0].shape) if len(model.outputs) == 1 else None
    if out is None or model.outputs[0] is not logits.output:
        raise ExportError(f"{where}: expected one output, the layer {output_layer!r}")
    if out[-1] != num_classes:
        raise ExportError(f"{where}: the model outputs {out[-1]} {output_layer} but there are {num_classes} "
                          + ("value names" if output_layer == VALUES_LAYER else "labels"))


# --- versions and layout ----------------------------------------------------------------------


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExportError(f"Invalid model name {name!r}. Expected letters, digits, '_', '.', '-' "
                          "(it becomes a folder name and part of TF Serving's URLs)")
    return name


def upload_tree(local: str, remote: str) -> None:
    """Copies the folder `local` to `remote` (gs://, s3:// ...) with gfile, `saved_model.pb` last."""
    import tensorflow as tf

    files = []
    for folder, _, names in os.walk(local):
        files += [os.path.join(folder, n) for n in names]
    # A reader that sees saved_model.pb sees a whole SavedModel.
    for path in sorted(files, key=lambda p: os.path.basename(p) == "saved_model.pb"):
        dst = join(remote, *os.path.relpath(path, local).split(os.sep))
        tf.io.gfile.makedirs(posixpath.dirname(dst))
        tf.io.gfile.copy(path, dst, overwrite=True)


def next_version(model_root: str) -> int:
    found = versions(model_root)
    return found[-1] + 1 if found else 1


# --- the graph --------------------------------------------------------------------------------


def examples_to_patches(serialized, spec: PatchSpec):
    """string [batch] serialized patch records -> `uint8 [batch, T, H, W, C]`, in pure TF.

    Uses the one record schema (`tfrecords_tools.schema`): its keys, its
    parsing spec and `decode_pixels`. Records of any encoding are accepted, so
    any shard can be replayed at the server; a record whose declared shape
    differs from the export's spec fails with a message saying so.
    """
    import tensorflow as tf

    s = record_schema
    # The jpeg/png spec reads the pixel data as a variable-length list: one string for
    # `raw`, one per frame for jpeg/png. Only the keys decoding needs are required, so a
    # client may send a record carrying just pixels, shape, encoding and version.
    full = s.feature_spec("jpeg")
    features = tf.io.parse_example(serialized, {k: full[k] for k in (s.PATCH, s.SHAPE, s.ENCODING, s.VERSION)})
    data = tf.sparse.to_dense(features[s.PATCH], default_value=b"")
    encoding = features[s.ENCODING]
    checks = [
        tf.debugging.assert_equal(features[s.VERSION], tf.constant(s.SCHEMA_VERSION, tf.int64),
                                  message=f"record {s.VERSION} differs from the schema version this model reads"),
        tf.debugging.assert_equal(features[s.SHAPE], tf.broadcast_to(tf.constant(spec.shape, tf.int64),
                                                                      tf.shape(features[s.SHAPE])),
                                  message=f"record {s.SHAPE} differs from the PatchSpec shape of this export "
                                          f"{list(spec.shape)}"),
        tf.debugging.Assert(tf.reduce_all((encoding == "raw") | (encoding == "jpeg") | (encoding == "png")),
                            [f"record {s.ENCODING} must be raw, jpeg or png; received", encoding]),
    ]
    frames = spec.frames

    def decode_one(args):
        record_data, record_encoding = args
        return tf.case([
            (tf.equal(record_encoding, "raw"), lambda: s.decode_pixels(record_data[0], "raw", spec.shape)),
            (tf.equal(record_encoding, "jpeg"), lambda: s.decode_pixels(record_data[:frames], "jpeg", spec.shape)),
        ], default=lambda: s.decode_pixels(record_data[:frames], "png", spec.shape), exclusive=True)

    with tf.control_dependencies(checks):
        data = tf.identity(data)
    return tf.map_fn(decode_one, (data, encoding),
                     fn_output_signature=tf.TensorSpec(spec.shape, tf.uint8))


def _label_table(labels_path: str):
    import tensorflow as tf

    init = tf.lookup.TextFileInitializer(labels_path, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                         tf.string, tf.lookup.TextFileIndex.WHOLE_LINE)
    return tf.lookup.StaticHashTable(init, default_value="")


def _build_enhance_archive(source: Artifact):
    """`serving_default` / `serve_examples` of an enhancement model: degraded uint8 patches -> enhanced pixels."""
    import keras
    import tensorflow as tf


    model, spec = source.model, source.spec

    def outputs(pixels):
        pixels = tf.cast(pixels, tf.float32)
        return {PIXELS: tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8), PIXELS_FLOAT: pixels}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_DEFAULT, lambda patches: outputs(model(patches, training=False)),
                         input_signature=[tf.TensorSpec([None, *spec.shape], tf.uint8, name=PATCHES)])
    archive.add_endpoint(SERVE_EXAMPLES,
                         lambda examples: outputs(model(examples_to_patches(examples, spec), training=False)),
                         input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES)])
    return archive, (SERVING_DEFAULT, SERVE_EXAMPLES)


def check_streaming(source: Artifact) -> None:
    """A streaming export needs a causal single-label classifier (`stp train --causal`)."""
    from stpkeras.models import causal

    if source.task != "classify" or source.multi_label:
        raise ExportError(f"{source.path}: --streaming exports single-label classifiers (task classify); "
                          f"the run's task is {source.task!r}" + (" (multi-label)" if source.multi_label else ""))
    if not causal.is_causal(source.model):
        raise ExportError(f"{source.path}: --streaming needs a causal model (its answer at a frame must not see "
                          "later frames); train one with `stp train --causal` (stcnn, r2plus1d, resnet3d)")


def _add_stream_endpoints(archive, model, spec: PatchSpec, outputs) -> Tuple[str, ...]:
    """`stream` and `init_state` (see the module's docstring) on the same layers and weights as `model`."""
    import tensorflow as tf

    from stpkeras.models import causal

    state = causal.state_spec(model)
    names = sorted(state)
    step = causal.stream_model(model)
    frames_sig = tf.TensorSpec([None, None, *spec.shape[1:]], tf.uint8, name=FRAMES)
    state_sigs = [tf.TensorSpec([None, *state[k][0]], tf.float32, name=k) for k in names]

    def stream(frames, *states):
        with causal.streaming(dict(zip(names, states))) as new:
            answers = outputs(step(frames, training=False))
        return {**answers, **{k: tf.cast(new[k], tf.float32) for k in names}}

    def init_state(streams):
        batch = tf.shape(streams)[:1]
        return {k: tf.zeros(tf.concat([batch, tf.constant(state[k][0], tf.int32)], 0), tf.float32) for k in names}

    archive.add_endpoint(STREAM, stream, input_signature=[frames_sig, *state_sigs])
    archive.add_endpoint(INIT_STATE, init_state, input_signature=[tf.TensorSpec([None], tf.int32, name=STREAMS)])
    return STREAM_SIGNATURES


def _build_archive(source: Artifact, labels_path: str, streaming: bool = False, features_of=None):
    """The export's endpoints; `features_of` is the model whose `features` layer answers `embeddings` (the
    model itself, or the one a flip-averaged `source.model` averages)."""
    import keras
    import tensorflow as tf

    if source.task == "enhance":
        return _build_enhance_archive(source)
    model, spec = source.model, source.spec
    features_of = model if features_of is None else features_of
    table = _label_table(labels_path)
    patch_sig = [tf.TensorSpec([None, *spec.shape], tf.uint8, name=PATCHES)]
    example_sig = [tf.TensorSpec([None], tf.string, name=EXAMPLES)]

    output_names = tf.constant(list(source.labels), tf.string)

    def outputs(out):
        out = tf.cast(out, tf.float32)  # mixed-precision models compute in float16
        if source.task == "regress":
            # Each value with its name: [batch, K] like the values, so a split batch joins back row by row.
            return {VALUES: out, VALUE_NAMES: tf.tile(output_names[None], [tf.shape(out)[0], 1])}
        if source.multi_label:
            return {LOGITS: out, PROBABILITIES: tf.sigmoid(out)}
        ids = tf.argmax(out, axis=-1, output_type=tf.int64)
        return {LOGITS: out, PROBABILITIES: tf.nn.softmax(out), CLASS_IDS: ids, CLASS_NAMES: table.lookup(ids)}

    def serve(patches):
        return outputs(model(patches, training=False))

    def serve_examples(examples):
        return outputs(model(examples_to_patches(examples, spec), training=False))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(table)  # a lookup table is a resource: tracked explicitly, its labels file becomes an asset
    archive.add_endpoint(SERVING_DEFAULT, serve, input_signature=patch_sig)
    archive.add_endpoint(SERVE_EXAMPLES, serve_examples, input_signature=example_sig)
    names = [SERVING_DEFAULT, SERVE_EXAMPLES]
    if any(layer.name == FEATURES_LAYER for layer in features_of.layers):
        # A second view of the same layers (shared weights) that also returns the pooled features.
        features = keras.Model(features_of.input, features_of.get_layer(FEATURES_LAYER).output, name="features_model")

        def embeddings(patches):
            return {EMBEDDINGS: tf.cast(features(patches, training=False), tf.float32)}

        archive.add_endpoint(EMBEDDINGS, embeddings, input_signature=patch_sig)
        names.append(EMBEDDINGS)
    if streaming:
        names += _add_stream_endpoints(archive, model, spec, outputs)
    return archive, tuple(names)


# --- warmup -----------------------------------------------------------------------------------


def warmup_requests(name: str, spec: PatchSpec, signatures: Sequence[str],
                    batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES,
                    stream_state: Optional[Dict[str, Tuple[int, ...]]] = None) -> List[bytes]:
    """Serialized `PredictionLog`s replayed by TF Serving's SavedModel warmup, one per signature and batch size.

    `stream_state` ({state key: shape without the batch}) is needed for a `stream` signature: its request
    is one frame per stream from the zero state.

    The pixels are a fixed pseudo-random pattern (warmup only needs the
    shapes; zeros would let a clever kernel take a shortcut it will not take later).
    """
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    rng = np.random.default_rng(0)
    logs = []
    for signature in signatures:
        for batch in batch_sizes:
            pixels = rng.integers(0, 256, size=(batch, *spec.shape), dtype=np.uint8)
            if signature == SERVE_EXAMPLES:
                inputs = {EXAMPLES: np.array([_example_of(p) for p in pixels], dtype=object)}
            elif signature == INIT_STATE:
                inputs = {STREAMS: np.zeros([batch], np.int32)}
            elif signature == STREAM:   # one new frame of each stream, from the zero state
                inputs = {FRAMES: pixels[:, :1], **{k: np.zeros((batch, *shape), np.float32)
                                                    for k, shape in (stream_state or {}).items()}}
            else:
                inputs = {PATCHES: pixels}
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            logs.append(log.SerializeToString())
    return logs


def _example_of(pixels: np.ndarray) -> bytes:
    t, h, w, _ = pixels.shape
    return record_schema.encode_patch(pixels, video_id="warmup", video_size=(t, h, w), index=(0, 0, 0),
                                      offset=(0, 0, 0), valid=(t, h, w), timestamp=0.0, split="")


def example_bytes(pixels: np.ndarray, encoding: str = "raw") -> bytes:
    """One `uint8 [T, H, W, C]` patch as a record for `serve_examples` (a stand-alone patch, no video)."""
    t, h, w, _ = pixels.shape
    return record_schema.encode_patch(pixels, encoding=encoding, video_id="", video_size=(t, h, w),
                                      index=(0, 0, 0), offset=(0, 0, 0), valid=(t, h, w), timestamp=0.0,
                                      split="")


def write_warmup(saved_model_dir: str, records: Sequence[bytes]) -> str:
    import tensorflow as tf

    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


# --- export -----------------------------------------------------------------------------------


def export_for_serving(model_or_run, out_root: str = "saved_models", name: Optional[str] = None,
                       version: Optional[int] = None, *, labels: Optional[Sequence[str]] = None,
                       spec: Optional[PatchSpec] = None,
                       warmup_batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES,
                       streaming: bool = False, tta: bool = False,
                       tta_flip_labels: Sequence[str] = ()) -> ExportResult:
    """Writes `out_root/name/version/`: the SavedModel, its assets and its warmup requests.

    `model_or_run` is a run folder, a `.keras` file (see `resolve_source`) or
    an `Artifact`. `name` defaults to the run folder's (or file's) name;
    `version` to the next free integer. An existing version is never
    overwritten. Returns where it wrote and what. `streaming=True` adds `stream` and `init_state` (a
    causal classifier only; `check_streaming`). `tta` (implied by `tta_flip_labels`) bakes the test-time
    flips of `stp predict --tta` into `serving_default` and `serve_examples` (`artifacts.flip_averaged`: 2^k
    passes a patch), so that TF Serving answers as `--tta` does; `embeddings` stays one pass.

    The version is claimed when the model is complete, under an exclusive lock on `out_root/name`
    (`outputs.writing`, waiting for it): exports to the same name at once get different versions,
    and a version folder that exists (even empty) is never replaced.
    """
    if isinstance(model_or_run, Artifact):
        source = model_or_run
    else:
        source = resolve_source(os.fspath(model_or_run), labels, spec)
    if streaming and (tta or tta_flip_labels):
        raise ExportError(f"{source.path}: --tta and --streaming: the stream signature answers each new frame "
                          "from its state in one pass; export the two separately")
    if streaming:
        check_streaming(source)
    plain = source
    if tta or tta_flip_labels:
        source = artifacts.flip_averaged(source, tta_flip_labels)
    if name is None:
        base = source.path if source.run is None else os.path.dirname(os.path.abspath(source.path))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(base))[0]) or "model"
    check_name(name)
    remote = is_remote(out_root)
    if remote:
        check_path(out_root)
    model_root = join(out_root, name)
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise ExportError(f"Invalid value for argument `version`. Expected a strictly positive integer. "
                          f"Received version={version!r}")
    if version is not None:
        _check_free(model_root, version)  # before the work; checked again when the version is claimed
    if not remote:
        os.makedirs(model_root, exist_ok=True)
    # A non-integer name: TF Serving's version scan skips it while it is being written. A remote export
    # is built in a local folder and uploaded to its version folder, saved_model.pb last: object stores
    # have no atomic folder rename (gs:// and s3:// rename object by object), and a model server
    # loads a version only once its saved_model.pb is there.
    staging = tempfile.mkdtemp(prefix=".export-", dir=None if remote else model_root)
    try:
        target = os.path.join(staging, "model")
        with tempfile.TemporaryDirectory() as scratch:
            labels_path = os.path.join(scratch, LABELS_ASSET)
            with open(labels_path, "w", encoding="utf-8") as f:
                f.write("".join(label + "\n" for label in source.labels))
            archive, signatures = _build_archive(source, labels_path, streaming, plain.model)
            archive.write_out(target, verbose=False)  # copies labels.txt into target/assets
        with open(os.path.join(target, "assets", SPEC_ASSET), "w", encoding="utf-8") as f:
            f.write(json.dumps(source.spec.to_dict(), indent=1, sort_keys=True) + "\n")
        state = _stream_info(source)["state"] if STREAM in signatures else None
        records = warmup_requests(name, source.spec, signatures, warmup_batch_sizes, state)
        write_warmup(target, records)
        with outputs.writing(model_root, wait=True):  # a no-op on gs:// and s3://
            version = version if version is not None else next_version(model_root)
            final = _check_free(model_root, version)
            _write_info(target, name, version, signatures, source)
            if remote:
                upload_tree(target, final)
            else:
                os.rename(target, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(final, name, version, signatures, source.labels, source.spec, len(records), source.tta)


def _check_free(model_root: str, version: int) -> str:
    """The path of `version` under `model_root`; raises `ExportError` when anything is there (even empty)."""
    final = join(model_root, str(version))
    taken = version in versions(model_root) if is_remote(model_root) else os.path.lexists(final)
    if taken:
        raise ExportError(f"{final}: version {version} exists; TF Serving may be serving it. "
                          f"Pick another version (the next free one is {next_version(model_root)})")
    return final


def _write_info(target: str, name: str, version: int, signatures, source: Artifact) -> None:
    import keras
    import tensorflow as tf

    info = {
        "name": name, "version": version, "signatures": list(signatures), "labels": list(source.labels),
        "spec": source.spec.to_dict(), "source": os.path.abspath(source.path), "task": source.task,
        "task_options": source.task_options,
        "streaming": _stream_info(source) if STREAM in signatures else None,
        "tta": {"flips": list(source.tta), "passes": artifacts.tta_passes(source.tta)} if source.tta else None,
        "run": {k: source.run.get(k) for k in ("task", "model", "config") if k in source.run} if source.run else None,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(target, INFO_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(info, indent=1) + "\n")


def _stream_info(source: Artifact) -> dict:
    from stpkeras.models import causal

    return {"window": source.spec.frames,
            "state": {k: list(shape) for k, (shape, _) in sorted(causal.state_spec(source.model).items())}}


# --- TF Serving model config ------------------------------------------------------------------


def find_models(root: str) -> Dict[str, List[int]]:
    """Model folders under `root` that hold at least one complete integer version: {name: versions}."""
    if not os.path.isdir(root):
        raise ExportError(f"{root}: no such folder")
    found = {}
    for name in sorted(os.listdir(root)):
        model_root = os.path.join(root, name)
        if not _NAME.match(name) or not os.path.isdir(model_root):
            continue
        complete = [v for v in versions(model_root)
                    if os.path.isfile(os.path.join(model_root, str(v), "saved_model.pb"))]
        if complete:
            found[name] = complete
    return found


def serving_config(root: str, base_path: Optional[str] = None) -> str:
    """A TF Serving `--model_config_file` text proto (`model_config_list`) for every model under `root`.

    `base_path` replaces `root` in the paths written (e.g. `/models` when the
    folder is mounted there in a container); by default the absolute path of
    `root`. The text is parsed back with the serving protos before it is returned.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    models = find_models(root)
    if not models:
        raise ExportError(f"{root}: no models found (expected NAME/VERSION/saved_model.pb, written by `stp export`)")
    prefix = base_path if base_path is not None else os.path.abspath(root)
    config = model_server_config_pb2.ModelServerConfig()
    for name in models:
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = f"{prefix.rstrip('/')}/{name}"
        entry.model_platform = "tensorflow"
    text = text_format.MessageToString(config)
    parsed = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    if parsed != config:  # pragma: no cover - a protobuf bug, not a user error
        raise ExportError("the model config did not survive a text round trip")
    return text
