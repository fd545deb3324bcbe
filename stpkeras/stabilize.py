"""Stabilize stage: a shaky video -> its camera path (a `--task stabilize` model) -> a steadier video.

    model = load_motion_model("runs/stabilize")      # a run folder or a .keras file in one
    stabilize_video(model, "shaky.mp4", "steady.mp4", smoothing=1.0)

Two streaming passes over the video, so memory holds a window of small frames and four floats
per frame, whatever the video's length and frame size:

1. *Motion* (`estimate_motion`): every frame is scaled down (`MotionWindows`: the model's window covers
   the central 1/`shake.ZOOM` of the frame, the scale the model was trained at) and cut into windows of
   the model's frame count, overlapping by half; the model gives the motion between each pair of
   neighbouring frames in each window, and overlapping estimates are averaged. Motions are scaled back to
   the frame's pixels: `float32 [frames - 1, 4]` (dx, dy pixels; rotation radians; log-scale).
2. *Render* (`render`): the motions are summed into a camera path, the path is smoothed (Gaussian,
   `smoothing` seconds), and each frame is warped (similarity, bilinear) by the difference between the
   smoothed and the original path, zoomed about the centre by one factor for the whole video so no
   border shows (`crop="auto"`; `"none"` leaves black borders), and written at the source's rate with its
   audio copied. With a cropping ratio as `crop` (e.g. 0.85: the output shows 85% of the frame's width
   and height), the zoom is chosen first and the path is the steadiest one that this crop leaves room for
   (`camera_paths.windowed_path`: its motion counted from the Gaussian path's, so a pan is kept).

The result reports the three measures of Liu et al. 2013 ("Bundled camera paths for video
stabilization") for input and output: cropping ratio (the scale left of the frame, mean over frames),
distortion (the anisotropy of the warp, worst frame: 1.0 for the similarity warps used here) and
stability (`stability_score`: the share of the 2nd-6th lowest frequencies in the spectrum of the camera
path's translation and rotation). The output's path is measured by the same model on the output's frames.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from stpkeras import artifacts
from stpkeras.camera_paths import MAX_ZOOM, crop_zoom, inverse_maps
from stpkeras.shake import MOTION, ZOOM, motion_units, projective_transforms
from tfrecords_tools import outputs
from tfrecords_tools.errors import BadInput
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import DEFAULT_COLOUR, REWRITE_COLOUR

DEFAULT_SMOOTHING = 1.0   # seconds: the Gaussian's sigma along the path
CROPS = ("auto", "none")   # or a cropping ratio in [1 / MAX_ZOOM, 1]
DEFAULT_BATCH_SIZE = 8


class StabilizeError(BadInput, ValueError):
    """A model or video that cannot be stabilized as asked (not a motion model, a video shorter than a window)."""


MotionModel = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class KerasMotion:
    """A `--task stabilize` model: `uint8 [n, T, H, W, 3]` windows -> `float32 [n, T - 1, 4]` motions in the
    model's units (`shake.relative_motion`)."""

    spec: PatchSpec
    model: object
    source: str

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        out = np.asarray(self.model(windows, training=False), np.float32)
        return out.reshape(len(windows), self.spec.frames - 1, MOTION)


def load_motion_model(path: str, size: Optional[int] = None) -> KerasMotion:
    """A run folder of `stp train --task stabilize`, or a `.keras` file in one.

    `size`: the side of the square window the model reads, in model pixels, where it is not the size it was
    trained at (softmotion only, `softmotion.at_size`: a larger window shows the frame at a finer scale).
    """
    artifact = artifacts.load(path, task="stabilize")
    if artifact.form != "keras":
        raise StabilizeError(f"{path}: an export; expected the run folder (or its .keras file) of "
                             "stp train --task stabilize")
    if artifact.task != "stabilize":
        raise StabilizeError(f"{path}: a run of task {artifact.task!r}; expected a motion model "
                             "(stp train --task stabilize)")
    if size is None or (size, size) == (artifact.spec.height, artifact.spec.width):
        return KerasMotion(artifact.spec, artifact.model, artifact.path)
    from stpkeras.models.softmotion import MIN_BLOCK, at_size

    if not isinstance(size, int) or isinstance(size, bool) or size < 2 * MIN_BLOCK:
        raise StabilizeError(f"{path}: a motion size of {size!r}; expected a whole number of pixels >= {2 * MIN_BLOCK}")
    spec = dataclasses.replace(artifact.spec, height=size, width=size)
    try:
        model = at_size(artifact.model, spec)
    except ValueError as e:
        raise StabilizeError(f"{path}: cannot read windows of {size}x{size}: {e}") from None
    return KerasMotion(spec, model, artifact.path)


# --- pass 1: motion ---------------------------------------------------------------------------


class MotionWindows:
    """Frame by frame, the motion between neighbouring frames, from overlapping windows through the model.

    `add(uint8 [H, W, 3] frame)` for every frame in order, then `finish()` -> `float32 [frames - 1, 4]`
    (dx, dy in the frame's pixels, rotation in radians, log-scale). Holds `spec.frames` small frames, a
    batch of windows and the running sums.
    """

    def __init__(self, model: MotionModel, spec: PatchSpec, height: int, width: int, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, stride: Optional[int] = None, path: str = "the video"):
        self.model, self.spec, self.path, self.batch_size = model, spec, path, batch_size
        self.stride = stride or max(1, (spec.frames - 1) // 2)
        # Model pixels per frame pixel: the model's window covers the central 1/ZOOM of the frame.
        self.scale = ZOOM * max(spec.height / height, spec.width / width)
        self.size = (max(spec.width, int(round(width * self.scale))), max(spec.height, int(round(height * self.scale))))
        self.window: collections.deque = collections.deque(maxlen=spec.frames)
        self.pending: List[tuple] = []
        self.sums: List[np.ndarray] = []
        self.counts: List[int] = []
        self.frames = 0
        self.last_start = -1
        self.model_s = 0.0

    def _small(self, frame: np.ndarray) -> np.ndarray:
        from PIL import Image

        small = np.asarray(Image.fromarray(frame).resize(self.size, Image.BILINEAR))
        top, left = (small.shape[0] - self.spec.height) // 2, (small.shape[1] - self.spec.width) // 2
        return small[top:top + self.spec.height, left:left + self.spec.width]

    def add(self, frame: np.ndarray) -> None:
        self.window.append(self._small(frame))
        self.frames += 1
        self.sums.append(np.zeros(MOTION, np.float64))
        self.counts.append(0)
        start = self.frames - self.spec.frames
        if start >= 0 and start % self.stride == 0:
            self._queue(start)

    def _queue(self, start: int) -> None:
        self.pending.append((start, np.stack(self.window)))
        self.last_start = start
        if len(self.pending) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        from tfrecords_tools.pixels import to_record

        t = time.perf_counter()
        motions = self.model(to_record(self.spec, np.stack([w for _, w in self.pending])))
        self.model_s += time.perf_counter() - t
        for (start, _), motion in zip(self.pending, motions):
            for i, m in enumerate(motion):
                self.sums[start + i] += m
                self.counts[start + i] += 1
        self.pending = []

    def finish(self) -> np.ndarray:
        if self.frames < self.spec.frames:
            raise StabilizeError(f"{self.path}: {self.frames} frame(s); the model estimates motion over windows of "
                                 f"{self.spec.frames} frames, so the video needs at least {self.spec.frames}")
        if self.last_start != self.frames - self.spec.frames:
            self._queue(self.frames - self.spec.frames)  # the tail: one more window ending at the last frame
        self._flush()
        motion = np.stack(self.sums[:-1]) / np.maximum(np.array(self.counts[:-1]), 1)[:, None]
        units = motion_units(self.spec.width)
        scale = np.array([1 / self.scale, 1 / self.scale, 1 / units, 1 / units])
        return (motion * scale).astype(np.float32)


def read_frames(path: str, max_pixels: Optional[int] = None, colour: str = DEFAULT_COLOUR):
    """`(VideoInfo, Plan, iterator of uint8 [H, W, 3] frames at the source's size)`, YUV read as `colour`
    (`tfrecords_tools.video.COLOURS`).

    The plan is the one decoding settles on (a second read when the first finds the container's
    timestamps or frame count wrong: `tfrecords_tools.video.Replan`); the caller restarts with it.
    """
    from tfrecords_tools.video import DEFAULT_MAX_PIXELS, FrameStream, make_plan, probe

    info = probe(path, max_pixels or DEFAULT_MAX_PIXELS)
    spec = PatchSpec(frames=1, height=1, width=1)  # no resampling, no resize: frames as they are

    def frames(plan):
        for frame, _ in FrameStream(info, spec, plan, colour=colour):
            yield frame

    return info, make_plan(info, spec), frames


def _each_frame(path: str, max_pixels, consumer_factory, colour: str = DEFAULT_COLOUR):
    """Feeds every frame to `consumer_factory(info, plan)` (an object with `add`), again from frame 0
    with the corrected plan if decoding finds the first plan wrong. Returns (info, plan, consumer)."""
    from tfrecords_tools.video import Replan

    info, plan, frames = read_frames(path, max_pixels, colour)
    for _ in range(3):
        consumer = consumer_factory(info, plan)
        try:
            for frame in frames(plan):
                consumer.add(frame)
            return info, plan, consumer
        except Replan as e:
            if hasattr(consumer, "close"):
                consumer.close()
            plan = e.plan
    raise StabilizeError(f"{path}: decoding does not settle on a frame count; re-encode it")


@dataclasses.dataclass(frozen=True)
class CameraMotion:
    """A video's frame-to-frame motion: `motions float32 [frames - 1, 4]` (`MotionWindows.finish`)."""

    motions: np.ndarray
    fps: float
    height: int
    width: int
    model_s: float = 0.0


def estimate_motion(model: KerasMotion, path: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_pixels: Optional[int] = None) -> CameraMotion:
    """Pass 1: the motion between every pair of neighbouring frames of `path` (see `MotionWindows`)."""
    info, plan, windows = _each_frame(path, max_pixels, lambda info, plan: MotionWindows(
        model, model.spec, plan.height, plan.width, batch_size=batch_size, path=path))
    return CameraMotion(windows.finish(), info.rate, plan.height, plan.width, windows.model_s)


# --- the path ---------------------------------------------------------------------------------


def camera_path(motions: np.ndarray) -> np.ndarray:
    """Frame-to-frame motions `[N - 1, 4]` -> the path `float64 [N, 4]` (their running sum; frame 0 at 0)."""
    return np.concatenate([np.zeros((1, MOTION)), np.cumsum(np.asarray(motions, np.float64), axis=0)])


def smooth(path: np.ndarray, fps: float, smoothing: float) -> np.ndarray:
    """The path smoothed by a Gaussian of `smoothing` seconds along time (edges held: 'nearest')."""
    from scipy.ndimage import gaussian_filter1d

    if smoothing <= 0:
        raise ValueError(f"Invalid value for argument `smoothing`. Expected a strictly positive number of seconds. "
                         f"Received smoothing={smoothing!r}")
    path = np.asarray(path, np.float64)
    # The least-squares line through the path is kept as it is and only what is left is smoothed (its ends
    # mirrored): a steady pan stays exactly a steady pan up to the first and last frames, which holding the
    # end values would bend.
    t = np.arange(len(path), dtype=np.float64)
    line = np.outer(t, np.polyfit(t, path, 1)[0]) + np.polyfit(t, path, 1)[1] if len(path) > 1 else path
    return gaussian_filter1d(path - line, sigma=smoothing * fps, axis=0, mode="reflect") + line


def crop_ratio(crop) -> Optional[float]:
    """`crop` ("auto", "none", or a cropping ratio as a number or its text) -> the ratio, or None for the
    two names. Raises ValueError for anything else."""
    if crop in CROPS:
        return None
    try:
        ratio = float(crop)
    except (TypeError, ValueError):
        ratio = None
    if ratio is None or not 1.0 / MAX_ZOOM <= ratio <= 1.0:
        raise ValueError(f"Invalid value for argument `crop`. Expected one of {CROPS} or a cropping ratio in "
                         f"[{1 / MAX_ZOOM:.3f}, 1]. Received crop={crop!r}")
    return ratio


# --- measures (Liu et al. 2013) -----------------------------------------------------------------


def stability_score(path: np.ndarray) -> Dict[str, float]:
    """Share of the 2nd-6th lowest frequencies (DC left out) in the energy of the path's translation (mean of
    x and y) and rotation; `stability` is the lower of the two. 1: all its movement is slow; a path with no
    movement at all counts as 1."""
    path = np.asarray(path, np.float64)

    def share(x):
        energy = np.abs(np.fft.rfft(x - x.mean())) ** 2
        total = energy[1:].sum()
        return 1.0 if total <= 1e-12 * max(1.0, len(x)) else float(energy[1:6].sum() / total)

    translation = (share(path[:, 0]) + share(path[:, 1])) / 2
    rotation = share(path[:, 2]) if path.shape[1] > 2 else 1.0
    return {"stability": min(translation, rotation), "stability_translation": translation,
            "stability_rotation": rotation}


def warp_measures(correction: np.ndarray, zoom: float) -> Dict[str, float]:
    """Cropping ratio (mean over frames of the linear scale from input to output, 1/(zoom e^s)) and distortion
    (worst frame's ratio of the two singular values of the warp's linear part: 1 for a similarity)."""
    a, _ = inverse_maps(correction, zoom)
    singular = np.linalg.svd(a, compute_uv=False)
    return {"cropping": float(np.mean(1.0 / (zoom * np.exp(np.asarray(correction)[:, 3])))),
            "distortion": float(np.min(singular[:, 1] / singular[:, 0]))}


def phase_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The translation `(dx, dy)` in pixels that carries frame `a` onto frame `b` (`uint8 [H, W, 3]` or grey
    `[H, W]`), by phase correlation of their Hann-windowed grey levels, to a tenth of a pixel (parabolic peak).
    An estimator independent of any model: the benchmark measures every method's output with it."""
    def grey(x):
        x = np.asarray(x, np.float64)
        x = x.mean(axis=2) if x.ndim == 3 else x
        window = np.outer(np.hanning(x.shape[0]), np.hanning(x.shape[1]))
        return (x - x.mean()) * window

    fa, fb = np.fft.fft2(grey(a)), np.fft.fft2(grey(b))
    cross = fb * np.conj(fa)
    corr = np.real(np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-9)))
    peak = np.unravel_index(np.argmax(corr), corr.shape)
    shift = []
    for axis, n in enumerate(corr.shape):
        i = peak[axis]
        before = corr[tuple((i - 1) % n if k == axis else peak[k] for k in range(2))]
        after = corr[tuple((i + 1) % n if k == axis else peak[k] for k in range(2))]
        denom = before - 2 * corr[peak] + after
        sub = 0.5 * (before - after) / denom if denom < 0 else 0.0
        shift.append(((i + sub + n / 2) % n) - n / 2)
    return np.array([shift[1], shift[0]])


# --- pass 2: render ----------------------------------------------------------------------------


class _AudioCopy:
    """Copies the source's first audio stream into `container`, packet by packet, interleaved with the video."""

    def __init__(self, source: str, container):
        import av

        self.input = av.open(source, metadata_errors="ignore")
        self.next = None
        if not self.input.streams.audio:
            self.input.close()
            self.input, self.packets = None, iter(())
            return
        audio = self.input.streams.audio[0]
        self.stream = container.add_stream_from_template(audio)
        self.container = container
        self.packets = (p for p in self.input.demux(audio) if p.dts is not None)
        self.next = None

    @property
    def copied(self) -> bool:
        return self.input is not None

    def until(self, seconds: float) -> None:
        """Muxes the audio packets that start before `seconds`."""
        while True:
            if self.next is None:
                self.next = next(self.packets, None)
                if self.next is None:
                    return
            if seconds != float("inf") and float(self.next.pts * self.next.time_base) > seconds:
                return
            self.next.stream = self.stream
            self.container.mux(self.next)
            self.next = None

    def close(self) -> None:
        if self.input is not None:
            self.input.close()


@dataclasses.dataclass
class StabilizeResult:
    video: str
    out: str
    frames: int = 0
    height: int = 0
    width: int = 0
    fps: float = 0.0
    smoothing: float = DEFAULT_SMOOTHING
    crop: str = "auto"
    zoom: float = 1.0
    audio: bool = False
    seconds: float = 0.0
    model_s: float = 0.0
    input: Dict[str, float] = dataclasses.field(default_factory=dict)
    output: Dict[str, float] = dataclasses.field(default_factory=dict)
    side_by_side: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Renderer:
    """Warps frame t by its transform and writes it (and the side-by-side row); measures the output's motion."""

    def __init__(self, transforms: np.ndarray, staged: dict, out: str, side_by_side: Optional[str], fps: float,
                 crf: int, fill: str, source: str, measure: Optional[MotionWindows]):
        from stpkeras.enhance import open_writer

        self.transforms, self.fill, self.measure = transforms, fill, measure
        self.writer = self.side = self.audio = None
        self._open = lambda h, w: (open_writer(staged[out], fps, crf, False, h, w),
                                   open_writer(staged[side_by_side], fps, crf, False, h, 2 * w) if side_by_side
                                   else None)
        self.source, self.fps = source, fps
        self.t = 0

    def add(self, frame: np.ndarray) -> None:
        import tensorflow as tf

        from stpkeras.shake import warp

        if self.writer is None:
            self.writer, self.side = self._open(*frame.shape[:2])
            self.audio = _AudioCopy(self.source, self.writer.container)
        out = warp(tf.constant(frame[None], tf.float32), self.transforms[self.t:self.t + 1], fill=self.fill)
        out = np.asarray(tf.cast(tf.clip_by_value(tf.round(out[0]), 0, 255), tf.uint8))
        self.audio.until(self.t / self.fps)
        self.writer.write(out)
        if self.side is not None:
            self.side.write(np.ascontiguousarray(np.concatenate([frame, out], axis=1)))
        if self.measure is not None:
            self.measure.add(out)
        self.t += 1

    def close(self) -> None:
        if self.audio is not None:
            self.audio.until(float("inf"))
            self.audio.close()
        for writer in (self.writer, self.side):
            if writer is not None:
                writer.close()
        self.writer = self.side = None
        self.audio_copied, self.audio = bool(self.audio and self.audio.copied), None


def render(path: str, out: str, motion: CameraMotion, *, smoothing: float = DEFAULT_SMOOTHING, crop="auto",
           side_by_side: Optional[str] = None, crf: int = 18, measure: Optional[MotionModel] = None,
           measure_spec: Optional[PatchSpec] = None, batch_size: int = DEFAULT_BATCH_SIZE,
           max_pixels: Optional[int] = None) -> StabilizeResult:
    """Pass 2: smooths the path of `motion` and writes `path` stabilized to `out` (see the module docstring).

    With `measure` (a motion model and its `measure_spec`), the output's path is measured on its frames;
    without, it is taken to be the smoothed path. Outputs are written atomically and never over `path`.
    """
    ratio = crop_ratio(crop)
    for written in (out, side_by_side):
        outputs.check_not_input(written, [path])
    started = time.perf_counter()
    trajectory = camera_path(motion.motions)
    smoothed = smooth(trajectory, motion.fps, smoothing)
    if ratio is not None:
        from stpkeras.camera_paths import PathError, windowed_path

        try:
            smoothed = windowed_path(trajectory, smoothed, motion.height, motion.width, 1.0 / ratio)
        except PathError as e:
            raise StabilizeError(f"{path}: --crop {ratio:g}: {e}") from e
    correction = smoothed - trajectory
    zoom = crop_zoom(correction, motion.height, motion.width) if crop != "none" else 1.0
    a, b = inverse_maps(correction, zoom)
    transforms = projective_transforms(a.astype(np.float32), b.astype(np.float32), motion.height, motion.width)
    fill = "CONSTANT" if crop == "none" else "NEAREST"  # beyond MAX_ZOOM: smear the edge rather than show black
    with contextlib.ExitStack() as stack:
        staged = {p: stack.enter_context(outputs.atomic_file(p)) for p in (out, side_by_side) if p}

        def renderer(info, plan):
            if plan.frames != len(trajectory) or (plan.height, plan.width) != (motion.height, motion.width):
                raise StabilizeError(f"{path}: {plan.frames} frames of {plan.width}x{plan.height}; the motion is "
                                     f"for {len(trajectory)} frames of {motion.width}x{motion.height}")
            windows = (MotionWindows(measure, measure_spec, plan.height, plan.width, batch_size=batch_size, path=out)
                       if measure is not None else None)
            return _Renderer(transforms, staged, out, side_by_side, motion.fps, crf, fill, path, windows)

        rendered = None
        try:
            # Written back: read so that a pixel left in place is written as it was (`REWRITE_COLOUR`); the
            # motion pass reads as the motion model's training data was converted.
            _, plan, rendered = _each_frame(path, max_pixels, renderer, colour=REWRITE_COLOUR)
        finally:
            if rendered is not None:
                rendered.close()
    output_path = camera_path(rendered.measure.finish()) if rendered.measure is not None else smoothed
    result = StabilizeResult(video=path, out=out, frames=len(trajectory), height=motion.height, width=motion.width,
                             fps=motion.fps, smoothing=smoothing, crop=str(crop), zoom=zoom,
                             audio=rendered.audio_copied, side_by_side=side_by_side)
    result.input = {**stability_score(trajectory), "cropping": 1.0, "distortion": 1.0}
    result.output = {**stability_score(output_path), **warp_measures(correction, zoom)}
    result.model_s = motion.model_s + (rendered.measure.model_s if rendered.measure is not None else 0.0)
    result.seconds = time.perf_counter() - started
    return result


def stabilize_video(model: KerasMotion, path: str, out: str, *, smoothing: float = DEFAULT_SMOOTHING,
                    crop="auto", side_by_side: Optional[str] = None, crf: int = 18,
                    batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: Optional[int] = None) -> StabilizeResult:
    """Estimates the camera motion of `path` with `model`, then renders it stabilized into `out`."""
    for written in (out, side_by_side):
        outputs.check_not_input(written, [path])
    started = time.perf_counter()
    motion = estimate_motion(model, path, batch_size=batch_size, max_pixels=max_pixels)
    result = render(path, out, motion, smoothing=smoothing, crop=crop, side_by_side=side_by_side, crf=crf,
                    measure=model, measure_spec=model.spec, batch_size=batch_size, max_pixels=max_pixels)
    result.seconds = time.perf_counter() - started
    return result
