"""Live stage: a causal classifier's label while a video plays (`stp watch MODEL SOURCE`).

    SOURCE (a file, '-' = stdin, rtsp:// http:// ... URL, camera device) --PyAV, reader thread-->
    bounded frame queue --(FrameStream.convert: turn, resize; cut the spatial grid)--> uint8 tiles
    [P, n, H, W, C] --(stream signature: new frames + state -> answer per frame + new state)--> the
    mean of the tiles' logits per frame -> label, score, latency, frames/s

Each spatial position of the patch grid is one stream of the batch, with its own state; a frame's
answer is the mean of their logits (as `stp predict` averages a window's patches). The state goes
in and out of every call (`stpkeras.models.causal`), so the model runs locally (an export with
`--streaming`, or a causal run folder / `.keras` file) or at a TF Serving server that keeps nothing
between calls (`--server`: the client carries the state).

The reader thread decodes into a queue of at most `queue_frames` frames; the model takes every frame
waiting (up to `max_chunk`) in one call, which is exact (a chunk answers as its frames one by one) and
lets a slow model catch up. Memory is bounded: the queue, the state (fixed size) and the last
`LATENCY_SAMPLES` latencies are all that is kept.

How it ends (`Summary.ended`, and `stp watch`'s exit code): `end` the source ended (0); `interrupted`
Ctrl-C / SIGINT (130, after the summary); `silent` no frame for `timeout_s` seconds (4, the
`NotNow` code: try again when the source is back). A source that cannot be opened or decoded is a
`VideoError` (exit 2).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import signal
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from stpkeras import artifacts
from stpkeras.artifacts import ArtifactError, Artifact
from stpkeras.signatures import FRAMES, INIT_STATE, LOGITS, STATE_PREFIX, STREAM, STREAMS
from tfrecords_tools import pixels as pixels_lib
from tfrecords_tools.errors import EXIT_NOT_NOW, EXIT_OK
from tfrecords_tools.patches import grid_starts
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import (FrameStream, OrientationReader, VideoError, VideoInfo, make_plan)

EXIT_INTERRUPTED = 130          # the shell's code for a process ended by SIGINT
EXIT_CODES = {"end": EXIT_OK, "interrupted": EXIT_INTERRUPTED, "silent": EXIT_NOT_NOW}
LATENCY_SAMPLES = 10_000        # the last this many frames' latencies make the percentiles
# A live source is probed briefly: FFmpeg's defaults (5 MB, 5 s of stream) hold the first answer back
# until that much has arrived, and a pipe or URL cannot be rewound anyway.
LIVE_PROBE = {"probesize": "32768", "analyzeduration": "500000"}
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """How `watch` reads SOURCE: `realtime` paces a file at its own timestamps (a live source paces
    itself); `timeout_s` is how long a silent source is waited for (None: for ever); `every` answers
    every N-th frame (every frame still goes through the model: the state needs it); `input_format` forces
    FFmpeg's demuxer (e.g. v4l2, mpegts)."""

    source: str
    realtime: bool = False
    timeout_s: Optional[float] = 10.0
    every: int = 1
    max_chunk: int = 8
    queue_frames: int = 64
    input_format: Optional[str] = None
    top_k: int = 3

    def __post_init__(self):
        for name in ("every", "max_chunk", "queue_frames", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid value for argument `{name}`. Expected a strictly positive integer. "
                                 f"Received {name}={value!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"Invalid value for argument `timeout_s`. Expected a positive number of seconds or "
                             f"None. Received timeout_s={self.timeout_s!r}")


@dataclasses.dataclass(frozen=True)
class Answer:
    """The model's answer at one frame: the label of the last T frames (T = the spec's frames)."""

    frame: int              # index of the frame in the stream (after any resampling to the spec's fps)
    time: float             # its timestamp, seconds
    label: str
    score: float            # softmax probability of `label`, from the tiles' mean logits
    top_k: Tuple[Tuple[str, float], ...]
    latency_ms: float       # from the frame's arrival (decoded) to this answer
    fps: float              # frames answered per second so far (wall clock from the first frame)

    def to_dict(self) -> dict:
        return {"frame": self.frame, "time": round(self.time, 4), "label": self.label, "score": round(self.score, 6),
                "top_k": [[k, round(v, 6)] for k, v in self.top_k], "latency_ms": round(self.latency_ms, 3),
                "fps": round(self.fps, 2)}

    def line(self) -> str:
        return (f"frame {self.frame:6d}  {self.time:8.2f}s  {self.label}  {self.score:.3f}  "
                f"latency {self.latency_ms:7.1f} ms  {self.fps:6.1f} frames/s")


@dataclasses.dataclass(frozen=True)
class Summary:
    source: str
    ended: str              # end, interrupted or silent
    frames: int             # frames through the model
    answers: int
    seconds: float          # wall clock from the first frame to the last answer
    fps: float              # frames / seconds: the rate it kept up with
    model_fps: float        # frames / seconds spent converting and in the model: the rate it could keep up with
    latency_p50_ms: Optional[float]
    latency_p99_ms: Optional[float]
    streams: int            # spatial positions (streams of the batch) per frame
    message: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.ended]

    def to_dict(self) -> dict:
        return {"summary": {k: (round(v, 3) if isinstance(v, float) else v)
                            for k, v in dataclasses.asdict(self).items()}}

    def line(self) -> str:
        lat = ("" if self.latency_p50_ms is None else
               f", latency p50 {self.latency_p50_ms:.1f} ms p99 {self.latency_p99_ms:.1f} ms")
        return (f"{self.source}: {self.ended}{' (' + self.message + ')' if self.message else ''}; {self.frames} "
                f"frames in {self.seconds:.1f}s ({self.fps:.1f} frames/s; the model alone {self.model_fps:.1f}){lat}")


# --- the model side: init_state and stream, local or remote ---------------------------------------


class Streamer:
    """`init(batch) -> state`, `step(frames uint8 [B, n, H, W, C], state) -> (logits float32 [B, n, K], state)`;
    the state is a dict of float32 arrays (`state_*`), opaque to the caller."""

    labels: Tuple[str, ...]
    spec: PatchSpec
    source: str

    def init(self, batch: int) -> Dict[str, object]:
        raise NotImplementedError

    def step(self, frames: np.ndarray, state: Dict[str, object]) -> Tuple[np.ndarray, Dict[str, object]]:
        raise NotImplementedError


class SavedModelStreamer(Streamer):
    """An export with `stream` and `init_state` (`stp export --streaming`), loaded in this process."""

    def __init__(self, artifact: Artifact):
        sigs = artifact.model.signatures
        missing = [s for s in (STREAM, INIT_STATE) if s not in sigs]
        if missing:
            raise ArtifactError(f"{artifact.path}: no {' or '.join(missing)} signature; export a causal run with "
                                "`stp export RUN --name NAME --streaming`")
        self._stream, self._init = sigs[STREAM], sigs[INIT_STATE]
        self.labels, self.spec, self.source = artifact.labels, artifact.spec, artifact.path

    def init(self, batch):
        import tensorflow as tf

        return dict(self._init(**{STREAMS: tf.zeros([batch], tf.int32)}))

    def step(self, frames, state):
        import tensorflow as tf

        out = self._stream(**{FRAMES: tf.constant(frames)}, **state)
        return out[LOGITS].numpy(), {k: v for k, v in out.items() if k.startswith(STATE_PREFIX)}


class KerasStreamer(Streamer):
    """A causal run folder or `.keras` file: its layers stepped directly (the same graph `--streaming` exports)."""

    def __init__(self, artifact: Artifact):
        import tensorflow as tf

        from stpkeras.models import causal

        if not causal.is_causal(artifact.model):
            raise ArtifactError(f"{artifact.path}: not a causal model (its answer at a frame sees later frames); "
                                "train one with `stp train --causal`")
        self._spec = causal.state_spec(artifact.model)
        model = causal.stream_model(artifact.model)

        @tf.function(reduce_retracing=True)
        def step(frames, state):
            with causal.streaming(state) as new:
                logits = model(frames, training=False)
            return tf.cast(logits, tf.float32), dict(new)

        self._step = step
        self.labels, self.spec, self.source = artifact.labels, artifact.spec, artifact.path

    def init(self, batch):
        return {k: np.zeros((batch, *shape), np.float32) for k, (shape, _) in self._spec.items()}

    def step(self, frames, state):
        logits, new = self._step(frames, state)
        return logits.numpy(), new


class RemoteStreamer(Streamer):
    """A TF Serving model (`--server`): labels and spec from the local export, state carried by this client."""

    def __init__(self, client, local: Artifact):
        self.client = client
        self.labels, self.spec, self.source = local.labels, local.spec, str(client.address)

    def init(self, batch):
        return self.client.predict({STREAMS: np.zeros([batch], np.int32)}, INIT_STATE)

    def step(self, frames, state):
        out = self.client.predict({FRAMES: frames, **{k: np.asarray(v, np.float32) for k, v in state.items()}},
                                  STREAM)
        if LOGITS not in out:
            raise ArtifactError(f"{self.source}: the server's `{STREAM}` answer lacks {LOGITS}; is it serving an "
                                "export of `stp export --streaming` of the same model as MODEL?")
        return np.asarray(out[LOGITS], np.float32), {k: v for k, v in out.items() if k.startswith(STATE_PREFIX)}


def open_streamer(model: str, client=None) -> Streamer:
    """MODEL (an export with `--streaming`, a causal run folder or `.keras` file) -> its `Streamer`; with
    `client` (`stpkeras.serving.connect`) the compute runs at the server and MODEL only gives labels and spec."""
    artifact = artifacts.load(model)
    if artifact.task != "classify" or artifact.multi_label:
        raise ArtifactError(f"{artifact.path}: a model of task {artifact.task!r}; `stp watch` runs single-label "
                            "causal classifiers (`stp train --causal`, `stp export --streaming`)")
    if client is not None:
        return RemoteStreamer(client, artifact)
    return KerasStreamer(artifact) if artifact.form == "keras" else SavedModelStreamer(artifact)


# --- the source side: a reader thread and the spatial grid -----------------------------------------


_END = object()


def _open(source: str, input_format: Optional[str], timeout_s: Optional[float]):
    import os

    import av

    live = source == "-" or source.startswith(URL_SCHEMES)
    options = dict(LIVE_PROBE) if live else {}
    if source.startswith(URL_SCHEMES) and timeout_s is not None:
        # FFmpeg's socket timeouts (microseconds): a network source that goes silent ends its read too.
        options.update(rw_timeout=str(int(timeout_s * 1e6)), timeout=str(int(timeout_s * 1e6)))
    target = "pipe:0" if source == "-" else source
    if source != "-" and not source.startswith(URL_SCHEMES) and not os.path.exists(source):
        raise VideoError(source, "no such file or device")
    if input_format is None and source.startswith("/dev/video"):
        input_format = "v4l2"
    try:
        container = av.open(target, format=input_format, options=options, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise VideoError(source, f"FFmpeg could not open it: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoError(source, "no video stream")
    return container


class _Reader(threading.Thread):
    """Decodes SOURCE into `(rgb uint8 [H, W, 3], seconds, arrival)` on a bounded queue; then `_END`, or the
    exception that stopped it. A daemon: a source that never answers cannot keep the process alive."""

    def __init__(self, config: WatchConfig, spec: PatchSpec):
        super().__init__(name="stp-watch-reader", daemon=True)
        self.config, self.spec = config, spec
        self.frames: "queue.Queue" = queue.Queue(maxsize=config.queue_frames)
        self.stop = threading.Event()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.frames.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self):
        try:
            for item in self._frames():
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the main thread, which raises it
            self._put(e)

    def _frames(self) -> Iterator[Tuple[np.ndarray, float, float]]:
        import av

        cfg, spec = self.config, self.spec
        container = _open(cfg.source, cfg.input_format, cfg.timeout_s)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = next((float(r) for r in (stream.average_rate, stream.guessed_rate) if r and float(r) > 0), 25.0)
            orientation = OrientationReader(cfg.source)
            converter, step, emitted, held, t0, wall0 = None, None, 0, None, None, None
            try:
                for frame in container.decode(stream):
                    arrival = time.monotonic()
                    t = frame.time if frame.time is not None else (emitted / rate)
                    turn = orientation(frame)
                    if converter is None:
                        height, width = turn.shown_size(frame.height, frame.width)
                        info = VideoInfo(cfg.source, stream.codec_context.name, width, height, rate, 0, t, t, turn)
                        converter = FrameStream(info, spec, make_plan(info, spec))
                        t0, wall0 = t, arrival
                        step = 1.0 / spec.fps if spec.fps else None
                    if cfg.realtime:
                        wait = wall0 + (t - t0) - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                            arrival = time.monotonic()
                    if step is None:
                        yield converter.convert(frame, turn), t, arrival
                        continue
                    # Resampled to the spec's fps as the converter does: frame k shows the latest frame at or
                    # before t0 + k / fps (held until the next one shows when it is due).
                    while held is not None and t0 + emitted * step < t - 0.25 * step:
                        yield held[0], t0 + emitted * step, held[1]
                        emitted += 1
                    held = (converter.convert(frame, turn), arrival)
                if held is not None:
                    yield held[0], t0 + emitted * step, held[1]
            except av.error.FFmpegError as e:
                if converter is None or not cfg.source.startswith(URL_SCHEMES):
                    raise VideoError(cfg.source, f"FFmpeg failed decoding: {e}") from e
                # A network source's read timed out or the server hung up: the stream ended.
        finally:
            container.close()


def grid(spec: PatchSpec, height: int, width: int) -> Tuple[List[int], List[int], Tuple[int, int]]:
    """The patch grid's rows and columns of a `height x width` frame, and the padded size that holds them."""
    ys = grid_starts(height, spec.height, spec.stride_height, spec.pad)
    xs = grid_starts(width, spec.width, spec.stride_width, spec.pad)
    if not ys or not xs:
        raise ValueError(f"frames of {height}x{width} hold no {spec.height}x{spec.width} patch (pad {spec.pad})")
    return ys, xs, (max(height, ys[-1] + spec.height), max(width, xs[-1] + spec.width))


def tiles(frames: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """`uint8 [n, H, W, 3]` RGB frames -> `[P, n, h, w, C]`: the spec's spatial grid, one stream per position,
    in the spec's pixel format (P = rows x columns of the grid; edge or zero padding as the spec's `pad`)."""
    n, height, width, _ = frames.shape
    ys, xs, (ph, pw) = grid(spec, height, width)
    if (ph, pw) != (height, width):
        mode = "edge" if spec.pad == "edge" else "constant"
        frames = np.pad(frames, [(0, 0), (0, ph - height), (0, pw - width), (0, 0)], mode=mode)
    out = np.stack([frames[:, y:y + spec.height, x:x + spec.width] for y in ys for x in xs])
    return pixels_lib.to_record(spec, out)  # RGB records are the frames themselves


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- the loop ---------------------------------------------------------------------------------------


def watch(streamer: Streamer, config: WatchConfig, emit: Callable[[Answer], None] = lambda a: None,
          *, clock: Callable[[], float] = time.monotonic) -> Summary:
    """Runs SOURCE through `streamer` until it ends, goes silent or SIGINT comes; `emit` gets each answer as
    soon as it is known. Returns the `Summary` (its `ended` says how it stopped)."""
    spec, labels = streamer.spec, streamer.labels
    reader = _Reader(config, spec)
    latencies: "collections.deque" = collections.deque(maxlen=LATENCY_SAMPLES)
    frames = answers = 0
    busy = 0.0
    first = last = None
    state = None
    streams = 0
    ended, message = "end", ""
    pending = None   # the end (or an error) met while gathering a chunk: handled after that chunk
    interrupted = threading.Event()
    reader.start()
    try:
        with _sigint_sets(interrupted):
            while True:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if pending is not None:
                    item = pending
                else:
                    item = _next_frame(reader.frames, config.timeout_s, interrupted)
                    if item is None:
                        ended, message = "silent", f"no frame for {config.timeout_s:g}s (--timeout)"
                        break
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                chunk = [item]
                while len(chunk) < config.max_chunk:   # whatever else is waiting: one call for all of it
                    try:
                        more = reader.frames.get_nowait()
                    except queue.Empty:
                        break
                    if more is _END or isinstance(more, BaseException):
                        pending = more
                        break
                    chunk.append(more)
                started = clock()
                first = first if first is not None else chunk[0][2]
                try:
                    batch = tiles(np.stack([c[0] for c in chunk]), spec)
                except ValueError as e:
                    raise VideoError(config.source, str(e)) from e
                if state is None:
                    streams = len(batch)
                    state = streamer.init(streams)
                logits, state = streamer.step(batch, state)
                mean = np.asarray(logits, np.float64).mean(axis=0)          # [n, K]: the tiles' mean per frame
                probs = _softmax(mean)
                done = clock()
                busy += done - started
                base = frames
                for i, (_, t, arrival) in enumerate(chunk):
                    index = base + i
                    frames = index + 1   # counted as answered: a Ctrl-C between two answers leaves the count true
                    latencies.append(done - arrival)
                    if (index + 1) % config.every:
                        continue
                    order = np.argsort(-probs[i], kind="stable")[:config.top_k]
                    answers += 1
                    last = done
                    emit(Answer(index, float(t), labels[order[0]], float(probs[i, order[0]]),
                                tuple((labels[j], float(probs[i, j])) for j in order), (done - arrival) * 1000.0,
                                (index + 1) / max(done - first, 1e-9)))
                last = done
    except KeyboardInterrupt:
        ended, message = "interrupted", "SIGINT"
    finally:
        reader.stop.set()
    seconds = (last - first) if first is not None and last is not None else 0.0
    lat = np.asarray(latencies) * 1000.0
    return Summary(config.source, ended, frames, answers, seconds, frames / seconds if seconds > 0 else 0.0,
                   frames / busy if busy > 0 else 0.0,
                   float(np.percentile(lat, 50)) if len(lat) else None,
                   float(np.percentile(lat, 99)) if len(lat) else None, streams, message)


@contextlib.contextmanager
def _sigint_sets(flag: threading.Event):
    """SIGINT sets `flag` instead of raising KeyboardInterrupt wherever the main thread happens to be. Raised
    inside a finaliser (TensorFlow frees objects all the time), it is printed and dropped: a Ctrl-C was once
    lost in the test suite, most likely that way. Outside the main thread (no handler can be set): as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield
    finally:   # None: a handler set outside Python; Python's own is the nearest thing to put back
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _next_frame(frames: "queue.Queue", timeout_s: Optional[float], interrupted: threading.Event):
    """The next item of the reader's queue; None after `timeout_s` seconds without one (None: wait for ever).
    Waits in slices of at most 0.1 s so that a Ctrl-C (`interrupted`) is seen within that time."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not interrupted.is_set():
        left = 0.1 if deadline is None else deadline - time.monotonic()
        try:
            return frames.get(timeout=max(min(0.1, left), 0.0))
        except queue.Empty:
            if deadline is not None and time.monotonic() >= deadline:
                return None
    raise KeyboardInterrupt


def frames_of(source: str, spec: PatchSpec) -> Iterator[np.ndarray]:
    """Every frame of SOURCE as `watch` sees it (`uint8 [H, W, 3]`), read to the end: for tests and baselines."""
    reader = _Reader(WatchConfig(source, timeout_s=None), spec)
    for item in reader._frames():
        yield item[0]
