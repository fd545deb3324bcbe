"""Input stage: converted TFRecords -> a batched, prefetched `tf.data.Dataset` of uint8 patches.

`make_dataset(...)` reads top to bottom as the chain

    manifest -> list shards -> shuffle files -> interleave reads -> shuffle records
             -> batch the serialized records -> parse + decode whole batches (one parallel map) -> prefetch

or, when each record needs work of its own (augmentation, a task's `element_fn`),

             -> parse + decode + augment each record (one parallel map) -> batch -> prefetch

Pixels stay `uint8 [T, H, W, 3]` all the way: the model normalises them in its
first layer, on the accelerator, which keeps every host pass a quarter of the
float size and matches the uint8 serving signature. There is no Python per
element: every function below is pure TF and works eagerly and inside
`Dataset.map`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from stpkeras import augment as augment_lib
from tfrecords_tools import manifest as manifest_lib
from tfrecords_tools import schema
from tfrecords_tools.spec import PatchSpec

AUTOTUNE = tf.data.AUTOTUNE

# Keys of the feature dicts that `make_dataset(..., as_supervised=False)` yields: the record's
# own keys, with `schema.PATCH` decoded to pixels. Only these travel (the rest are dropped at parse).
FEATURE_KEYS = (schema.PATCH, schema.LABEL, schema.VIDEO_ID, schema.INDEX, schema.OFFSET, schema.VALID,
                schema.TIMESTAMP)

Splits = Union[str, Sequence[str], None]


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a converted folder holds, read once from its manifest."""

    root: str
    manifest: dict
    spec: PatchSpec
    encoding: str
    compression: str  # the `compression_type` of `TFRecordDataset`: '', 'GZIP' or 'ZLIB'
    labels: Tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_mode(self) -> str:
        """"single", "multi" (records carry `label/multi_hot`) or "none"."""
        return manifest_lib.label_mode(self.manifest)

    @property
    def value_names(self) -> Tuple[str, ...]:
        """The names of the records' `value/data` entries; () when they carry none."""
        return tuple(manifest_lib.value_names(self.manifest))

    def target_spec(self) -> Dict[str, tf.io.FixedLenFeature]:
        """The parsing spec of the optional targets this data's records carry (sizes from the manifest):
        `label/multi_hot` int64 [C] for multi-label data, `value/data` float32 [K] for data with values."""
        spec = schema.feature_spec(self.encoding, num_classes=len(self.labels) if self.label_mode == "multi" else 0,
                                   num_values=len(self.value_names))
        return {key: spec[key] for key in (schema.MULTI_HOT, schema.VALUES) if key in spec}

    @property
    def splits(self) -> Tuple[str, ...]:
        return tuple(manifest_lib.split_names(self.manifest))

    def resolve(self, split: Splits) -> Tuple[str, ...]:
        """`None` or `'all'` -> every split; a name or names -> those, checked."""
        if split is None or split == "all":
            return self.splits
        names = (split,) if isinstance(split, str) else tuple(split)
        missing = [n for n in names if n not in self.manifest["splits"]]
        if missing or not names:
            raise manifest_lib.UnknownSplit(
                f"{manifest_lib.manifest_path(self.root)}: no split {', '.join(map(repr, missing or names))}. "
                f"Available: {sorted(self.splits)}")
        return names

    def files(self, split: Splits) -> List[str]:
        return [f for name in self.resolve(split) for f in manifest_lib.shard_files(self.root, self.manifest, name)]

    def num_records(self, split: Splits) -> int:
        return sum(manifest_lib.num_records(self.manifest, name) for name in self.resolve(split))

    def sha256(self) -> str:
        """Hash of the manifest (which holds every shard's sha256): names the data a run saw."""
        import hashlib
        import json
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()


def load_info(root: str, spec: Optional[PatchSpec] = None) -> DataInfo:
    """Reads `ROOT/dataset.json` (local or any `tf.io.gfile` path) and checks it.

    `read_manifest` checks the format and schema version. When `spec` is
    given (the spec a model was built for), the data's patch shape must match it.
    """
    data = manifest_lib.read_manifest(root)
    data_spec = manifest_lib.spec_of(data)
    if spec is not None and tuple(spec.shape) != tuple(data_spec.shape):
        raise manifest_lib.ManifestError(
            f"{manifest_lib.manifest_path(root)}: patches are {'x'.join(map(str, data_spec.shape))}, "
            f"but the model expects {'x'.join(map(str, spec.shape))} (T x H x W x C).")
    return DataInfo(root=root, manifest=data, spec=data_spec, encoding=data["encoding"],
                    compression=manifest_lib.compression_type(data), labels=tuple(data["labels"]))


# --- the chain's functions, pure TF ---------------------------------------------------------------

def parse(serialized: tf.Tensor, encoding: str, keys: Sequence[str] = FEATURE_KEYS,
          targets: Optional[Dict[str, tf.io.FixedLenFeature]] = None) -> Dict[str, tf.Tensor]:
    """Serialized records -> the features in `keys` (and the optional `targets`, `DataInfo.target_spec`),
    pixels still encoded.

    `serialized` is one record (a scalar string) or a batch of them (`[B]`);
    every feature then has that leading `[B]`. Features not in `keys` are
    skipped by the parser, not parsed and dropped.
    """
    spec = schema.feature_spec(encoding)
    features = tf.io.parse_example(serialized, {**{key: spec[key] for key in keys}, **(targets or {})})
    if encoding != "raw" and schema.PATCH in features:
        features[schema.PATCH] = tf.sparse.to_dense(features[schema.PATCH])  # one string per frame
    return features


def decode(features: Dict[str, tf.Tensor], encoding: str, spec: PatchSpec) -> Dict[str, tf.Tensor]:
    """Decodes `features[schema.PATCH]` to `uint8 [T, H, W, C]`, or `[B, T, H, W, C]` for a batch.

    The shape is static but for `B`. The label, when present, becomes int32.
    """
    features = dict(features)
    data = features[schema.PATCH]
    if data.shape.rank == (0 if encoding == "raw" else 1):  # one record
        pixels = schema.decode_pixels(data, encoding, spec.shape)
    elif encoding == "raw":
        # One copy for the whole batch: from the records' bytes straight into the `[B, ...]` tensor.
        pixels = tf.ensure_shape(tf.reshape(tf.io.decode_raw(data, tf.uint8), [-1, *spec.shape]),
                                 data.shape.concatenate(spec.shape))
    else:
        # JPEG and PNG decoders take one image per op: record by record, frame by frame.
        pixels = tf.map_fn(lambda frames: schema.decode_pixels(frames, encoding, spec.shape), data,
                           fn_output_signature=tf.TensorSpec(spec.shape, tf.uint8))
    features[schema.PATCH] = pixels
    if schema.LABEL in features:
        features[schema.LABEL] = tf.cast(features[schema.LABEL], tf.int32)
    return features


def target_element(info: DataInfo, key: str, augment: Sequence[str] = ()):
    """`(serialized record, seed) -> (uint8 patch, float32 target)` for the target `key` of the records, with
    `augment` applied to the pixels: `schema.MULTI_HOT` (`[C]` of 0 and 1), `schema.VALUES` (`[K]`), or
    `schema.LABEL` as a one-hot `[C]`. What multi-label classification and regression train on."""
    specs = info.target_spec()
    if key != schema.LABEL and key not in specs:
        raise ValueError(f"{info.root}: the records carry no {key!r} (the manifest's label_mode is "
                         f"{info.label_mode!r}, value_names {list(info.value_names)})")
    ops = augment_lib.parse_augment(augment)
    augment_fn = augment_lib.make_augment(ops, info.spec.pixels)
    encoding, spec, classes = info.encoding, info.spec, len(info.labels)
    if key == schema.LABEL:
        keys, targets = (schema.PATCH, schema.LABEL), None
    else:
        keys, targets = (schema.PATCH,), {key: specs[key]}

    def element(serialized, seed):
        features = decode(parse(serialized, encoding, keys, targets), encoding, spec)
        patch = augment_fn(features[schema.PATCH], seed) if ops else features[schema.PATCH]
        if key == schema.LABEL:
            return patch, tf.one_hot(features[key], classes, dtype=tf.float32)
        return patch, tf.cast(features[key], tf.float32)

    return element


def flipped_label_element(info: DataInfo, augment: Sequence[str], flip_labels: Sequence[str]):
    """`(serialized record, seed) -> (uint8 patch, int32 label)`: `augment` applied to the pixels, then the flips
    of `flip_labels` (`augment.parse_flip_labels`), each swapping the label with its mirror image."""
    ops = augment_lib.parse_augment(augment)
    augment_fn = augment_lib.make_augment(ops, info.spec.pixels)
    flips = augment_lib.make_label_flips(augment_lib.parse_flip_labels(flip_labels, info.labels), info.spec.pixels)
    encoding, spec = info.encoding, info.spec

    def element(serialized, seed):
        features = decode(parse(serialized, encoding, (schema.PATCH, schema.LABEL)), encoding, spec)
        seeds = tf.random.experimental.stateless_split(seed, 2)
        patch = augment_fn(features[schema.PATCH], seeds[0]) if ops else features[schema.PATCH]
        return flips(patch, features[schema.LABEL], seeds[1])

    return element


def value_stats(info: DataInfo, splits: Splits) -> Tuple[List[float], List[float]]:
    """(mean [K], standard deviation [K]) of the records' `value/data` over `splits` (one pass that parses
    nothing else). A constant value gets a deviation of 1, so dividing by it is safe."""
    import numpy as np

    spec = {schema.VALUES: info.target_spec()[schema.VALUES]}
    ds = tf.data.TFRecordDataset(info.files(splits), compression_type=info.compression)
    ds = ds.batch(1024).map(lambda s: tf.io.parse_example(s, spec)[schema.VALUES])
    values = np.concatenate([b.numpy() for b in ds]).astype(np.float64) if info.num_records(splits) else None
    if values is None or not len(values):
        raise ValueError(f"{info.root}: no records in {splits!r} to take the values' mean and deviation from")
    std = values.std(axis=0)
    return [float(v) for v in values.mean(axis=0)], [float(v) if v > 0 else 1.0 for v in std]


def supervised(features: Dict[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor]:
    """Feature dict -> `(uint8 patch, int32 label)`, what `Model.fit` takes for classification."""
    return features[schema.PATCH], features[schema.LABEL]


def num_workers(strategy: Optional[tf.distribute.Strategy]) -> int:
    """Input workers of `strategy` (hosts, each running one copy of the pipeline)."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None:
        return 1
    cluster = resolver.cluster_spec()
    jobs = cluster.jobs if cluster else []
    return max(1, sum(cluster.num_tasks(job) for job in ("chief", "worker") if job in jobs))


def shard_policy(num_files: int, workers: int) -> tf.data.experimental.AutoShardPolicy:
    """FILE when every worker gets at least one shard of its own, else DATA.

    FILE sharding means each worker reads only its files; with fewer files than
    workers some workers would get nothing, so each reads everything and keeps
    every `workers`-th element instead.
    """
    policy = tf.data.experimental.AutoShardPolicy
    return policy.FILE if num_files >= workers else policy.DATA


def read_buffer_size(root: str) -> Optional[int]:
    """The TFRecord read buffer for shards under `root`: none for local files, TF's default for remote ones.

    A local read goes straight into the record's string; a buffer in between
    copies every record once more, and a patch record is hundreds of KB.
    Remote file systems (gs://, s3://) keep TF's default buffer, which their
    latency needs.
    """
    return 0 if "://" not in root or root.startswith("file://") else None


def spread(dataset: tf.data.Dataset, records: int, count: int, batch_size: int) -> tf.data.Dataset:
    """`count` elements of a batched `dataset` of `records` elements, every k-th of them so that each video of
    the split has a say (the manifest keeps a video's patches together), in batches of `batch_size`."""
    stride = max(1, records // count)
    return dataset.unbatch().shard(stride, 0).take(count).batch(batch_size)


def make_dataset(data: Union[str, DataInfo], split: Splits = "train", *, batch_size: int = 32,
                 training: bool = False, augment: Union[str, Sequence[str], None] = None,
                 shuffle_buffer: int = 1024, seed: Optional[int] = None, deterministic: bool = False,
                 repeat: bool = False, drop_remainder: Optional[bool] = None,
                 strategy: Optional[tf.distribute.Strategy] = None, as_supervised: bool = True,
                 spec: Optional[PatchSpec] = None, cache: bool = False,
                 element_fn: Optional[Callable[[tf.Tensor, tf.Tensor], object]] = None,
                 skip_batches: int = 0) -> tf.data.Dataset:
    """Streams the patches of `split` from a converted folder.

    Args:
      data: the converted folder (a local or `gs://` path) or its `DataInfo`.
      split: a split name, a list of names, or `None`/`'all'` for every split.
      batch_size: patches per replica; the dataset's batch is `batch_size x
        strategy.num_replicas_in_sync` (the global batch `Model.fit` splits over replicas).
      training: shuffles files and records, applies `augment`, and drops the
        last partial batch (static batch shape, even split over replicas).
        Off (evaluation): records in manifest order, no augmentation, every record kept.
      augment: op names from `stpkeras.augment` (`'flip,crop,color'`, `'none'`); training only.
      shuffle_buffer: records in the shuffle buffer (held still encoded).
      seed: seeds file order, record order and augmentation. `None` draws one.
      deterministic: same batches on every run with the same `seed` (ordered
        parallel reads and maps); the default lets tf.data return elements out
        of order, which is faster when one element is slow.
      repeat: repeat forever (then pass `steps_per_epoch` to `fit`).
      drop_remainder: defaults to `training`.
      strategy: a `tf.distribute.Strategy` to batch and shard for.
      as_supervised: yield `(uint8 [B, T, H, W, 3], int32 [B])`; else a dict
        with `FEATURE_KEYS` (label, video id, grid index ... travel with each patch) and the optional
        targets of `DataInfo.target_spec` (multi-hot labels, values).
      spec: the `PatchSpec` a model expects; the data must have its shape.
      cache: keep the serialized records in memory after the first pass (parsing and
        decoding still run every epoch).
      element_fn: a task's own element, `(serialized record, seed int64 [2]) -> element`
        (e.g. two augmented views for `embed`, `(patch, mask)` for `segment`), pure TF. It
        replaces parse/decode/augment/`as_supervised`; `augment` must then be None (the
        task applies its own). Every element gets its seed, also when not training.
      skip_batches: start the stream after its first `skip_batches` batches (a resumed run
        goes on where the killed one stopped). Their records are read and shuffled, with their
        seeds, but not parsed, decoded or augmented.

    Returns:
      A `tf.data.Dataset` whose `cardinality()` is exact (from the manifest).
    """
    info = data if isinstance(data, DataInfo) else load_info(data, spec)
    if spec is not None and tuple(spec.shape) != tuple(info.spec.shape):
        raise manifest_lib.ManifestError(f"{info.root}: patches are {info.spec.shape}, the model expects {spec.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid value for argument `batch_size`. Expected a strictly positive integer. "
                         f"Received batch_size={batch_size!r}")
    if not isinstance(skip_batches, int) or skip_batches < 0:
        raise ValueError(f"Invalid value for argument `skip_batches`. Expected an integer >= 0. "
                         f"Received skip_batches={skip_batches!r}")
    ops = augment_lib.parse_augment(augment) if training else ()
    if element_fn is not None and ops:
        raise ValueError("Invalid arguments: `augment` and `element_fn` are exclusive (the element applies "
                         f"its own augmentation). Received augment={augment!r}")
    drop_remainder = training if drop_remainder is None else drop_remainder
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    global_batch = batch_size * replicas
    files = info.files(split)
    records = info.num_records(split)
    if training and drop_remainder and records < global_batch:
        raise ValueError(f"{info.root}: split {split!r} holds {records} records, fewer than one batch of "
                         f"{global_batch} ({batch_size} per replica x {replicas}); lower `batch_size`.")
    # One seed for the run; `random` (not tf) so an unseeded pipeline differs between runs.
    seed = random.SystemRandom().randrange(2 ** 31) if seed is None else int(seed)
    encoding, spec = info.encoding, info.spec
    augment_fn = augment_lib.make_augment(ops, spec.pixels)
    # Raw records whose augmentations all have a batch form go through the batched path.
    batch_augment_fn = augment_lib.make_batch_augment(ops, spec.pixels) if ops and encoding == "raw" else None

    # Ordered unless training asks for speed: evaluation reads in a fixed order.
    ordered = deterministic or not training
    # Only what the element needs is parsed: a supervised element uses the pixels and the label.
    # A feature dict also carries the records' optional targets (multi-hot labels, values).
    keys = (schema.PATCH, schema.LABEL) if as_supervised else FEATURE_KEYS
    targets = None if as_supervised else info.target_spec()

    def to_element(serialized, element_seed=None):
        """A serialized record, or a batch of them, -> what the dataset yields."""
        if element_fn is not None:
            return element_fn(serialized, element_seed)
        features = decode(parse(serialized, encoding, keys, targets), encoding, spec)
        if batch_augment_fn is not None:
            features[schema.PATCH] = batch_augment_fn(features[schema.PATCH], element_seed)
        elif ops:
            features[schema.PATCH] = augment_fn(features[schema.PATCH], element_seed)
        return supervised(features) if as_supervised else features

    # A deterministic repeated training stream is a function of the seed alone, the same from every
    # iterator: its reshuffles take their seeds from the pass number, not from the seed generators a
    # dataset keeps across iterators (`reshuffle_each_iteration`). `Model.fit` draws a batch from a
    # first iterator to build the model, and a resumed run's (`skip_batches`) reads further than an
    # uninterrupted run's: with those generators, the training iterator after it would start from other
    # shuffles. Only for a deterministic run, whose promise (the same weights after a kill and a resume)
    # needs it. Not across workers (sharding by file needs the file list as
    # the stream's source), nor with `cache` (which would then hold the endless stream).
    stateless = training and repeat and deterministic and not cache and num_workers(strategy) == 1
    buffer_size = read_buffer_size(info.root)

    def read(names: tf.data.Dataset) -> tf.data.Dataset:
        # Interleave reads several shards at once: a sequential reader would wait on each file's
        # latency (gs://) and hand the shuffle buffer records from one shard at a time. Reading is
        # the largest cost of raw records (a copy and a CRC per record), so it runs on several threads.
        return names.interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type=info.compression, buffer_size=buffer_size),
            cycle_length=min(len(files), 8), block_length=1, num_parallel_calls=AUTOTUNE, deterministic=ordered)

    if stateless:
        def one_pass(p):
            # Pass p reads the files in the order of the stateless seed (seed, p), checked against the
            # manifest's count (a shard cut short fails the pass that reads it), and is shuffled on its
            # own, so an epoch is exactly one pass: a buffer's worth of records at a time, each block by
            # a stateless seed from (seed + 1, p, block), since `Dataset.shuffle` takes no seed that
            # depends on the pass. A pass that fits the buffer is shuffled whole.
            order = tf.random.experimental.stateless_shuffle(tf.constant(files),
                                                             tf.stack([tf.constant(seed, tf.int64), p]))
            one = read(tf.data.Dataset.from_tensor_slices(order))
            one = one.apply(tf.data.experimental.assert_cardinality(records))
            pass_seed = tf.stack([tf.constant(seed + 1, tf.int64), p])
            blocks = one.batch(shuffle_buffer).enumerate().prefetch(1)  # the next block reads meanwhile
            fold_in = tf.random.experimental.stateless_fold_in
            return blocks.flat_map(lambda b, block: tf.data.Dataset.from_tensor_slices(
                tf.random.experimental.stateless_shuffle(block, fold_in(pass_seed, b))))

        ds = tf.data.Dataset.counter().flat_map(one_pass)
        ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    else:
        ds = tf.data.Dataset.from_tensor_slices(files)
        if training:
            # Reshuffled every epoch; seeded, so the sequence of epochs is the same on every run.
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = read(ds).apply(tf.data.experimental.assert_cardinality(records))
        if cache:
            ds = ds.cache()
        if training:
            # Shuffle the serialized records, before decoding: the buffer then holds compressed
            # bytes (jpeg/png) and decoding runs once per record that leaves it.
            ds = ds.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        if repeat:
            # After the shuffle, so an epoch boundary does not mix records from two epochs.
            ds = ds.repeat()
    # Raw records with nothing to do per record are parsed and decoded a batch at a time (below).
    # JPEG and PNG decode one frame per op anyway; record by record, the parallel map spreads that
    # work evenly over the cores (measured: a batch per call is slower for them).
    per_record = (bool(ops) and batch_augment_fn is None) or element_fn is not None or encoding != "raw"
    if ops or element_fn is not None:
        # One stateless seed per element, drawn by a seeded stream that changes every epoch in training:
        # augmentation is then deterministic even when the map returns elements out of order. In
        # evaluation the stream restarts each pass, so an element (e.g. a degraded patch for enhance,
        # validation views for embed) is the same every epoch.
        seeds = tf.data.Dataset.random(seed=seed + 2, rerandomize_each_iteration=training and not stateless).batch(2)
        if per_record:
            ds = tf.data.Dataset.zip(ds, seeds)
    if per_record:
        # Skipped before the map: the skipped records are never parsed or decoded, and their seeds go with them.
        ds = ds.skip(skip_batches * global_batch)
        # Each record is parsed, decoded and augmented on its own (the augmentations draw per
        # patch), then the patches are batched.
        ds = ds.map(to_element, num_parallel_calls=AUTOTUNE, deterministic=ordered)
        ds = ds.batch(global_batch, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                      deterministic=True)
    else:
        # Batch the serialized records first, then parse and decode a batch per
        # call. Batching moves the record strings (no copy), one parse and one decode op serve the
        # whole batch, and the raw bytes are copied once, into the batch tensor; decoding record by
        # record and batching afterwards copies every pixel once more. A flip is then applied to
        # the decoded batch, patch by patch with each patch's seed (`augment.make_batch_augment`).
        ds = ds.batch(global_batch, drop_remainder=drop_remainder)
        if ops:
            # The seeds travel a batch at a time too: element i still gets the stream's i-th seed
            # (a last, smaller batch takes the first of its seeds), one zip per batch, not per record.
            ds = tf.data.Dataset.zip(ds, seeds.batch(global_batch)).skip(skip_batches).map(
                lambda serialized, batch_seeds: to_element(serialized, batch_seeds[:tf.shape(serialized)[0]]),
                num_parallel_calls=AUTOTUNE, deterministic=ordered)
        else:
            ds = ds.skip(skip_batches).map(to_element, num_parallel_calls=AUTOTUNE, deterministic=ordered)
    ds = ds.prefetch(AUTOTUNE)

    options = tf.data.Options()
    options.deterministic = ordered
    options.experimental_distribute.auto_shard_policy = shard_policy(len(files), num_workers(strategy))
    ds = ds.with_options(options)
    return ds
