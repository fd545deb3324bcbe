"""Inference stage: the one streaming loop from a video to a model's answer.

    decode -> cut (`tfrecords_tools.video.video_patches`, in a reader thread, a few batches ahead)
           -> batch -> model -> head

A *head* is what a task does with the model's outputs for one video (`Head`): average the logits,
probabilities or values (label a video, score it), average them per temporal window (a timeline), average
the embeddings (retrieval), blend overlapping outputs back into frames (enhance, segment). The loop
owns what every head would otherwise repeat: the reader thread and
its prefetch bound, batching, the pixel format of the model's input, timing, and the re-plan
protocol (a second `Plan` from `video_patches` voids everything since the previous one: the loop
drops its pending patches and calls `head.start(plan)` again). Memory stays bounded: at most
`prefetch` batches wait in the queue, and a head keeps only what its output needs.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Dict, Generic, Iterator, List, NamedTuple, Optional, Tuple, TypeVar

import numpy as np

from tfrecords_tools.errors import BadInput
from tfrecords_tools.patches import Patch
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import DEFAULT_COLOUR, DEFAULT_MAX_PIXELS, Plan, video_patches

PREFETCH_BATCHES = 2
Result = TypeVar("Result")


class NoPatches(BadInput, ValueError):
    """A video too small (or too short) for a single patch of the model's spec."""


class Head(Generic[Result]):
    """What one task does with a video's model outputs. The loop calls, in order:

    `start(plan)` at every (re)start of the read, `add(patches, outputs)` for every batch (`patches`
    are the cut `Patch`es, `outputs` the model's answer for them), and `finish()` once at the end,
    which returns the result.
    """

    def start(self, plan: Plan) -> None:
        pass

    def add(self, patches: List[Patch], outputs) -> None:
        raise NotImplementedError

    def finish(self) -> Result:
        raise NotImplementedError


class Timing:
    """Seconds spent decoding and cutting (reader thread) and in the model, for one video."""

    def __init__(self):
        self.decode_s = 0.0
        self.model_s = 0.0
        self.patches = 0


def prefetch(items: Iterator, depth: int = PREFETCH_BATCHES) -> Iterator:
    """Runs `items` in a thread, at most `depth` items ahead; re-raises its exception here.

    Leaving the loop early (break, exception) stops the reader within 0.1 s.
    """
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for x in items:
                if not put(("item", x)):  # the consumer left: stop decoding
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e))
            return
        put(("done", None))

    thread = threading.Thread(target=work, name="stp-decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "error":
                raise x
            if kind == "done":
                return
            yield x
    finally:
        stop.set()
        thread.join(timeout=10)


def _batches(events: Iterator, spec: PatchSpec, batch_size: int, timing: Timing) -> Iterator:
    """`video_patches` events -> `Plan`s and `(patches, uint8 [n, *spec.shape] in spec's pixel format)` batches.

    Runs in the reader thread, so stacking and packing the pixels overlap with the model.
    """
    from tfrecords_tools.pixels import to_record

    def batch(patches):
        return patches, to_record(spec, np.stack([p.pixels for p in patches]))

    pending: List[Patch] = []
    t = time.perf_counter()
    for event in events:
        if isinstance(event, Plan):
            pending = []  # a new read plan: what came before it is void
            timing.decode_s += time.perf_counter() - t
            yield event
        else:
            pending.append(event)
            if len(pending) < batch_size:
                continue
            ready, pending = batch(pending), []
            timing.decode_s += time.perf_counter() - t
            yield ready
        t = time.perf_counter()
    if pending:
        ready = batch(pending)
        timing.decode_s += time.perf_counter() - t
        yield ready


def run_video(path: str, spec: PatchSpec, model: Callable[[np.ndarray], object], head: Head[Result], *,
              batch_size: int, cut: Optional[PatchSpec] = None, max_pixels: Optional[int] = None,
              timing: Optional[Timing] = None, region: Optional[Tuple[int, int, int, int]] = None,
              colour: str = DEFAULT_COLOUR) -> Result:
    """Streams the video `path` through `model` into `head`; returns `head.finish()`.

    `spec` is the model's `PatchSpec`: batches go to `model` as its input, `uint8 [n, *spec.shape]` in
    its pixel format. `cut` is the grid to cut (default `spec`; enhance and segment cut overlapping,
    edge-padded patches of the same size). `region` (`Plan.region`): only that part of every frame is
    read. `colour`: how YUV becomes RGB (`tfrecords_tools.video.COLOURS`; the conversion's by default; a head
    that writes the frames back to a video reads with `REWRITE_COLOUR`). Raises `NoPatches` when not
    one patch fits.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"Invalid value for argument `batch_size`. Expected a strictly positive integer. "
                         f"Received batch_size={batch_size!r}")
    cut = cut or spec
    timing = timing if timing is not None else Timing()
    events = video_patches(path, cut, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, region=region,
                           colour=colour)
    for event in prefetch(_batches(events, spec, batch_size, timing)):
        if isinstance(event, Plan):
            timing.patches = 0
            head.start(event)
            continue
        patches, pixels = event
        t = time.perf_counter()
        outputs = model(pixels)
        timing.model_s += time.perf_counter() - t
        timing.patches += len(patches)
        head.add(patches, outputs)
    if timing.patches == 0:
        raise NoPatches(f"{path}: no patches: the video is smaller than one patch ({cut.describe()})")
    return head.finish()


class MeanHead(Head[np.ndarray]):
    """The mean over a video's patches of `outputs float [n, D]` after `transform` (e.g. L2 normalisation)."""

    def __init__(self, transform: Callable[[np.ndarray], np.ndarray] = lambda x: x):
        self.transform = transform
        self.total: Optional[np.ndarray] = None
        self.count = 0

    def start(self, plan: Plan) -> None:
        self.total, self.count = None, 0

    def add(self, patches, outputs) -> None:
        s = self.transform(np.asarray(outputs)).astype(np.float64).sum(axis=0)
        self.total = s if self.total is None else self.total + s
        self.count += len(patches)

    def finish(self) -> np.ndarray:
        return (self.total / self.count).astype(np.float32)


class OverlapAddHead(Head[Result]):
    """For outputs aligned pixel for pixel with the input (enhancement, segmentation masks).

    The outputs of overlapping patches are blended back into frames by weighted overlap-add
    (`tfrecords_tools.patches.PatchAssembler`), and so are the input patches, so every finished
    frame goes, in order, to `frame(t, input uint8 [H, W, 3], output uint8 [H, W, channels])`. Only
    about a patch length of frames is held. Subclasses implement `frame` and `result`, may turn a
    patch's output into what is blended (`patch_output`), and extend `start` (calling it here).
    """

    def __init__(self, cut: PatchSpec, overlap, channels: int = 3):
        self.cut, self.overlap, self.channels = cut, tuple(overlap), channels
        self.plan: Optional[Plan] = None

    def start(self, plan: Plan) -> None:
        from tfrecords_tools.patches import PatchAssembler

        self.plan = plan
        self._inputs = PatchAssembler(self.cut, self.overlap, plan.frames, plan.height, plan.width)
        self._outputs = PatchAssembler(self.cut, self.overlap, plan.frames, plan.height, plan.width,
                                       channels=self.channels)

    def patch_output(self, output: np.ndarray) -> np.ndarray:
        return output

    def add(self, patches, outputs) -> None:
        for patch, output in zip(patches, outputs):
            frames_in = list(self._inputs.add(patch.pixels, patch.offset, patch.valid))
            frames_out = list(self._outputs.add(self.patch_output(output), patch.offset, patch.valid))
            self._hand_on(frames_in, frames_out)

    def _hand_on(self, frames_in, frames_out) -> None:
        for (t, frame_in), (t_out, frame_out) in zip(frames_in, frames_out):
            assert t == t_out, (t, t_out)  # both assemblers see the same patches
            self.frame(t, frame_in, frame_out)

    def frame(self, t: int, frame_in: np.ndarray, frame_out: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> Result:
        self._hand_on(list(self._inputs.finish()), list(self._outputs.finish()))
        return self.result()

    def result(self) -> Result:
        raise NotImplementedError


class Window(NamedTuple):
    """The patches of one temporal window (one grid row in time): its times and mean output."""

    index: int          # the window's temporal grid index
    start: float        # seconds of its first frame
    end: float          # seconds after its last real frame
    patches: int
    mean: np.ndarray    # float32 [D]: the mean of its patches' outputs


class WindowHead(Head[List[Window]]):
    """Per temporal window (the patches that share a first frame), the mean of `outputs float [n, D]`:
    a timeline of the video, in order. A window's end is its first frame's time plus its real frames'
    duration (1 / the spec's fps, or the video's mean frame duration when the spec keeps its rate)."""

    def __init__(self, spec: PatchSpec):
        self.spec = spec
        self.windows: Dict[int, list] = {}
        self.frame_s = 0.0

    def start(self, plan: Plan) -> None:
        self.windows = {}
        self.frame_s = 1.0 / self.spec.fps if self.spec.fps else (plan.end - plan.start) / max(plan.frames, 1)

    def add(self, patches, outputs) -> None:
        for patch, row in zip(patches, np.asarray(outputs, np.float64)):
            entry = self.windows.setdefault(patch.index[0], [patch.timestamp, 0, 0.0, 0])
            entry[1] = max(entry[1], patch.valid[0])
            entry[2] = entry[2] + row
            entry[3] += 1

    def finish(self) -> List[Window]:
        return [Window(t, float(start), float(start + frames * self.frame_s), count,
                       (total / count).astype(np.float32))
                for t, (start, frames, total, count) in sorted(self.windows.items())]
