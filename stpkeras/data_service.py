"""Input stage, disaggregated: the tf.data service (a dispatcher and CPU workers) decodes and augments for a trainer.

For when decoding and augmentation need more CPUs than the trainer has. The
trainer ships the input pipeline's graph to a dispatcher; workers on other
machines run it and stream finished elements back over gRPC.

    trainer:  shard file list --(dispatcher hands out files, one at a time)-->
    workers:  read records -> shuffle -> parse + decode + augment -> batch
    trainer:  <-- batches from every worker, as they come -> (trace) -> (patch, label) -> fit

Processing mode is `distributed_epoch` (`ShardingPolicy.DYNAMIC`): the file
list is the split source, so within an epoch every file, and hence every
record, is handed to exactly one worker once.

A worker that dies (TF 2.21, read from tensorflow/core/data/service and
measured in tests/test_data_service.py):
  - The epoch waits for it. The dispatcher never drops a worker from a job:
    `worker_timeout_ms` only serves tf.data snapshots, the job is finished when
    every one of its tasks has reported the end of its input, and the trainer
    skips over an unreachable worker and retries it forever. A new worker at
    another address does not release the epoch.
  - A worker started again at the same HOST:PORT takes the task back, reads
    the files the dispatcher has not yet handed out, and the epoch ends. So
    `stp data-service worker` serves from a child process that
    `stpkeras.supervise` starts again at the same address when it dies; a
    machine that goes away needs a scheduler that brings a worker back at its
    address (a Kubernetes StatefulSet).
  - Records are delivered at most once (DYNAMIC sharding's guarantee): what the
    dead worker had read but not yet delivered (the rest of its open files,
    its shuffle buffer, its prefetched batches) is lost for that epoch and
    never sent twice; later epochs are complete again.
`stall_warning_callback` says so in the trainer's output when no batch comes.
A dispatcher started with a work folder journals its state and recovers it on restart.

Workers need only TensorFlow (same version as the trainer) and read access to
the shards' paths; stpkeras itself runs in the trainer.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence

import tensorflow as tf

from stpkeras import augment as augment_lib
from stpkeras import pipeline
from stpkeras.supervise import SERVICE_PREFIX, service_address  # noqa: F401  (TF-free: the supervisor checks it too)
from tfrecords_tools import schema

def start_dispatcher(port: int, work_dir: Optional[str] = None,
                     worker_timeout_s: float = 10.0) -> tf.data.experimental.service.DispatchServer:
    """Starts a dispatcher on `port` (0: a free one); with `work_dir`, its journal survives restarts."""
    config = tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=work_dir is not None,
        # How soon a silent worker is declared missing. In TF 2.21 only snapshots act on it: a job
        # keeps the dead worker's task and waits for a worker at that address (module docstring).
        worker_timeout_ms=int(worker_timeout_s * 1000))
    return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher: str, port: int = 0, host: str = "localhost") -> tf.data.experimental.service.WorkerServer:
    """Starts a worker that registers with `dispatcher` (HOST:PORT); `host` is how others reach this machine."""
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=service_address(dispatcher), port=port, worker_address=f"{host}:%port%")
    return tf.data.experimental.service.WorkerServer(config)


def make_service_dataset(info: pipeline.DataInfo, split: pipeline.Splits, service: str, *, batch_size: int,
                         augment: Sequence[str] = (), shuffle_buffer: int = 1024, seed: Optional[int] = None,
                         trace_file: Optional[str] = None, trace_epoch: Optional[tf.Variable] = None,
                         as_supervised: bool = True) -> tf.data.Dataset:
    """Batches of `split` produced by the tf.data service at `service` (grpc://HOST:PORT).

    The chain of `pipeline.make_dataset` with the two changes the service needs:
    no cardinality assertion (each worker reads only the files it is handed),
    and the last batch of each worker kept (`drop_remainder=False`), so every
    record of the epoch reaches the trainer. Per-element augmentation seeds
    come from a stateful generator on the worker: a seeded stream zipped in
    (as `make_dataset` does) is a second source the dispatcher cannot split.

    Args:
      batch_size: the global batch (the trainer's `strategy` splits it over replicas).
      trace_file: append, per batch that reaches the trainer, one line
        `EPOCH video_id:t,y,x ...` for its records (a `tf.print` in the trainer's graph, no Python).
      trace_epoch: an int64 variable holding the epoch (`TraceEpoch` sets it); -1 marks
        batches read outside an epoch (Keras' fit peeks at one batch to build the model).

    Returns:
      `(uint8 [B, T, H, W, 3], int32 [B])` batches of `batch_size` but the last of an epoch; the
      graph's cardinality is unknown, `ds.cardinality()` in Python gives the batches of a complete
      epoch (for Keras' `fit`, see the end of this function).
    """
    files = info.files(split)
    encoding, spec = info.encoding, info.spec
    ops = augment_lib.parse_augment(augment)
    augment_fn = augment_lib.make_augment(ops, spec.pixels)

    def to_element(serialized):
        features = pipeline.decode(pipeline.parse(serialized, encoding), encoding, spec)
        if ops:
            element_seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
            features[schema.PATCH] = augment_fn(features[schema.PATCH], element_seed)
        return {key: features[key] for key in (schema.PATCH, schema.LABEL, schema.VIDEO_ID, schema.INDEX)}

    # The split source: the dispatcher hands these file names to workers one at a time.
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=info.compression, buffer_size=1 << 22),
        cycle_length=min(len(files), 4), block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    # Each worker shuffles what it reads; with many files per worker this mixes videos as make_dataset does.
    ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    ds = ds.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
        service=SERVICE_PREFIX + service_address(service)))
    # Trainer side from here on. Each worker ends the epoch with a partial batch, so how many batches
    # arrive depends on how the files fell: rebatched here, a complete epoch is always
    # ceil(records / batch_size) batches, and one with records lost to a dead worker is fewer.
    ds = ds.rebatch(batch_size)
    if trace_file is not None:
        epoch = trace_epoch if trace_epoch is not None else tf.Variable(-1, dtype=tf.int64, trainable=False)
        ds = ds.map(lambda b: trace_batch(b, trace_file, epoch))
    if as_supervised:
        ds = ds.map(pipeline.supervised)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    # Keras' fit takes an epoch of unknown length to be as long as the first one it saw and cuts the
    # later ones to it (keras/src/trainers/epoch_iterator.py; tensorflow/tensorflow#41571): a first
    # epoch short of records lost to a dead worker would cut every later, complete one. Keras reads
    # the length from `dataset.cardinality()` in Python, so this dataset states the length of a
    # complete epoch there, an upper bound (the graph's cardinality stays unknown); a shorter epoch
    # then simply ends early.
    complete = -(-info.num_records(split) // batch_size)
    ds.cardinality = lambda: tf.constant(complete, tf.int64)
    return ds


def trace_batch(batch: dict, path: str, epoch: tf.Variable) -> dict:
    """Appends `EPOCH video_id:t,y,x ...` for the batch's records to `path`; returns `batch` unchanged."""
    index = tf.strings.reduce_join(tf.strings.as_string(batch[schema.INDEX]), axis=-1, separator=",")
    line = tf.strings.reduce_join(batch[schema.VIDEO_ID] + ":" + index, separator=" ")
    # One string argument: tf.print quotes strings only when they come with other values.
    printed = tf.print(tf.strings.join([tf.strings.as_string(epoch.read_value()), line], " "),
                       output_stream="file://" + path)
    with tf.control_dependencies([printed]):
        return {k: tf.identity(v) for k, v in batch.items()}


def trace_epoch_callback(variable: tf.Variable):
    """A Keras callback that keeps `variable` at the current epoch (for `make_service_dataset`'s trace)."""
    import keras

    class TraceEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            variable.assign(epoch)

        def on_epoch_end(self, epoch, logs=None):
            variable.assign(-1)

    return TraceEpoch()


def stall_warning_callback(service: str, after_s: float = 60.0, echo: Callable[[str], None] = print):
    """A Keras callback that reports, once per stall, when no batch has come from `service` for `after_s` s.

    The trainer cannot tell a slow worker from a dead one (it retries a dead
    worker forever, see the module docstring), so this says in the output what
    to do instead of leaving a silent hang. A daemon thread watches the time of
    the last batch; validation and epoch-end work count as progress.
    """
    import keras

    if not after_s > 0:
        raise ValueError(f"Invalid value for argument `after_s`. Expected a strictly positive value. "
                         f"Received after_s={after_s!r}")

    class StallWarning(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self._last = time.monotonic()
            self._stop = threading.Event()
            threading.Thread(target=self._watch, name="stall-warning", daemon=True).start()

        def on_train_end(self, logs=None):
            self._stop.set()

        def _progress(self, *args, **kwargs):
            self._last = time.monotonic()

        on_train_batch_end = on_test_batch_end = on_epoch_begin = on_epoch_end = _progress

        def _watch(self):
            warned_at = None
            while not self._stop.wait(min(after_s, 5.0)):
                idle = time.monotonic() - self._last
                if idle < after_s:
                    warned_at = None
                elif warned_at != self._last:
                    warned_at = self._last
                    echo(f"warning: no batch from the tf.data service at {service} for {idle:.0f} s. If a worker "
                         "died, the epoch waits until a worker is started again at its HOST:PORT (`stp "
                         "data-service worker --port P --host H`); a worker at another address does not release "
                         "it, and the records the dead worker had in flight are lost for this epoch.")

    return StallWarning()
