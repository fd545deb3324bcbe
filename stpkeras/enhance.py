"""Enhance stage: a whole video through an enhancement model, patch by patch, and back into a video.

    enhancer = load_enhancer("runs/denoise")          # run folder, .keras file or SavedModel export
    enhance_video(enhancer, "noisy.mp4", "clean.mp4", reference="pristine.mp4")

The video is decoded and cut by `tfrecords_tools.video.video_patches`, the
converter's own code, on a grid of the model's patch size with an `overlap`
(`patches.overlap_spec`: `edge` padding, so any frame size works and every pixel
is covered). Patches go through the model in batches while a second thread
decodes, and `patches.PatchAssembler` puts the outputs back by overlap-add
with a raised-cosine window: neighbouring patches cross-fade, so no seam shows,
and a model that returns its input gives back the input exactly. Frames are
written as soon as no later patch can touch them, so memory holds about one
patch length of frames, whatever the video's length. The output is H.264 at
the source's declared frame rate (`crf`), or lossless RGB (`libx264rgb`, qp 0)
so measurements are not blurred by the output codec. The crf defaults to the model's kind (`default_crf`):
a restoration learnt from pairs gains tenths of a dB, which crf 18 writes half away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator, Optional, Tuple

import numpy as np

from stpkeras import artifacts
from stpkeras.artifacts import Artifact
from stpkeras.inference import OverlapAddHead, Timing, run_video
from stpkeras.signatures import PATCHES, PIXELS, PIXELS_FLOAT, SERVING_DEFAULT
from tfrecords_tools import outputs
from tfrecords_tools.errors import BadInput
from tfrecords_tools.patches import overlap_spec
from tfrecords_tools.spec import PatchSpec

DEFAULT_BATCH_SIZE = 8
# The output's H.264 crf: a model trained on degradations it makes itself (noise, blur) gains whole dBs and
# crf 18 keeps them; one trained on pairs (`stp convert --pairs`, a `path,target` CSV: restoring a codec's
# or a camera's losses) gains tenths of a dB, and crf 18 wrote away over half of a camera restoration's
# (bikes at crf 37: +0.058 dB of luma at 18, +0.127 at 10; docs/benchmarks.md).
DEFAULT_CRF, PAIRED_CRF = 18, 10


class EnhanceError(BadInput, ValueError):
    """A model or video that cannot be enhanced as asked (not an enhancer, mismatched reference ...)."""


def default_overlap(spec: PatchSpec) -> Tuple[int, int, int]:
    """A quarter of the patch on every axis: seams vanish, and the model runs ~2.4x per pixel for 8x64x64."""
    return tuple(max(0, s // 4) for s in spec.size)  # type: ignore[return-value]


# --- the model --------------------------------------------------------------------------------


class Enhancer:
    """An enhancement model: `uint8 [batch, T, H, W, 3]` -> float32 pixels of the same shape (0-255 units)."""

    spec: PatchSpec
    source: str
    paired: bool = False   # trained on pairs (`task_options["paired"]`): a restoration

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        patches = np.asarray(patches)
        if patches.dtype != np.uint8 or patches.ndim != 5 or patches.shape[1:] != self.spec.shape:
            shape = ", ".join(map(str, self.spec.shape))
            raise EnhanceError(f"{self.source}: expected uint8 patches [batch, {shape}]; "
                               f"received {patches.dtype} {list(patches.shape)}")
        return self._run(patches)

    def _run(self, patches: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class KerasEnhancer(Enhancer):
    """A `.keras` enhancement model (a run's `best.keras`): float32 pixels out."""

    def __init__(self, artifact: Artifact):
        import tensorflow as tf

        self.source, self.spec, self.model = artifact.path, artifact.spec, artifact.model
        self.paired = bool(artifact.task_options.get("paired"))
        if PIXELS not in [layer.name for layer in self.model.layers]:
            raise EnhanceError(f"{self.source}: no layer {PIXELS!r}; expected an enhancement model (unet3d, dncnn3d)")
        self._call = tf.function(lambda x: tf.cast(self.model(x, training=False), tf.float32), reduce_retracing=True)

    def _run(self, patches):
        return self._call(patches).numpy()


class SavedModelEnhancer(Enhancer):
    """An export of an enhancement run (`stp export`): its `serving_default` returns `pixels_float`."""

    def __init__(self, artifact: Artifact):
        self.source, self.spec = artifact.path, artifact.spec
        self.paired = bool(artifact.task_options.get("paired"))
        self._loaded = artifact.model  # the signature's function holds on to it
        self._serve = artifact.model.signatures[SERVING_DEFAULT]
        if PIXELS_FLOAT not in self._serve.structured_outputs:
            raise EnhanceError(f"{self.source}: its {SERVING_DEFAULT} has no {PIXELS_FLOAT!r} output; expected "
                               "an export of an enhancement run")

    def _run(self, patches):
        return self._serve(**{PATCHES: patches})[PIXELS_FLOAT].numpy()


def load_enhancer(path: str, spec: Optional[PatchSpec] = None, *, tta: bool = False) -> Enhancer:
    """A run folder (best.keras), a `.keras` file in its run folder, or an export (`saved_models/NAME[/VERSION]`).

    `tta`: each patch is enhanced as it is and flipped left-right, top-bottom, backwards in time and every
    combination of them, and the eight outputs, flipped back, averaged (`artifacts.flip_averaged`): 8x the
    model's work for a cleaner estimate.
    """
    artifact = artifacts.load(path, spec=spec, task="enhance")
    if artifact.form == "keras" and artifact.run is not None and artifact.task != "enhance":
        raise EnhanceError(f"{path}: a run of task {artifact.task!r}; expected an enhancement model "
                           "(stp train --task enhance)")
    if tta:
        if artifact.form != "keras":
            raise EnhanceError(f"{path}: --tta runs the flips in this process on a run or .keras file; received "
                               "an export, which runs as it is (`stp export --tta` writes one that averages the flips)")
        artifact = artifacts.flip_averaged(artifact)
    return KerasEnhancer(artifact) if artifact.form == "keras" else SavedModelEnhancer(artifact)


def default_crf(enhancer: Enhancer) -> int:
    """The output's crf when none is given: `PAIRED_CRF` for a model trained on pairs, else `DEFAULT_CRF`."""
    return PAIRED_CRF if enhancer.paired else DEFAULT_CRF


# --- measuring --------------------------------------------------------------------------------


def frame_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 frames, capped like `quality.psnr`."""
    from stpkeras.quality import MAX_PSNR
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * np.log10(255.0 ** 2 / mse))


def frame_ssim(a: np.ndarray, b: np.ndarray) -> float:
    from stpkeras.quality import ssim
    return float(ssim(a, b))


@dataclasses.dataclass
class EnhanceResult:
    video: str
    out: str
    frames: int = 0
    height: int = 0
    width: int = 0
    fps: float = 0.0
    crf: Optional[int] = None   # the output's H.264 crf (None: lossless)
    patches: int = 0
    seconds: float = 0.0
    model_s: float = 0.0
    reference: Optional[str] = None
    # Means over frames against the reference (None without one).
    input_psnr: Optional[float] = None
    input_ssim: Optional[float] = None
    output_psnr: Optional[float] = None
    output_ssim: Optional[float] = None
    side_by_side: Optional[str] = None
    frame_png: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the video --------------------------------------------------------------------------------


def _reference_frames(path: str, spec: PatchSpec, max_pixels: int) -> Iterator[np.ndarray]:
    from tfrecords_tools.video import REWRITE_COLOUR, FrameStream, Replan, make_plan, probe

    info = probe(path, max_pixels)
    try:  # read as the input is, to be compared with it
        for frame, _ in FrameStream(info, spec, make_plan(info, spec), colour=REWRITE_COLOUR):
            yield frame
    except Replan as e:
        raise EnhanceError(f"{path}: the reference's frames do not decode as its container declares ({e.why}); "
                           "re-encode it") from e


def open_writer(path: str, fps: float, crf: int, lossless: bool, height: int, width: int):
    from tfrecords_tools.video import VideoWriter

    writer = VideoWriter(path, fps, crf=crf, lossless=lossless)
    if not lossless and (height % 2 or width % 2):
        # yuv420p halves both chroma sides, so libx264 refuses odd sizes; 4:4:4 keeps the exact size
        # (fewer players decode it than 4:2:0; --lossless RGB has the same limit).
        writer.stream.pix_fmt = "yuv444p"
    return writer


def _write_png(path: str, frames) -> None:
    from PIL import Image
    Image.fromarray(np.concatenate(frames, axis=1)).save(path)


class _Enhancement(OverlapAddHead[None]):
    """enhance_video's head: writes each blended frame (and the side-by-side row, the PNG, the scores)."""

    def __init__(self, cut: PatchSpec, overlap, video: str, staged: dict, *, out: str, fps: float, crf: int,
                 lossless: bool, reference: Optional[str], side_by_side: Optional[str], frame_png: Optional[str],
                 frame_index: Optional[int], max_pixels: int):
        super().__init__(cut, overlap)
        self.video, self.staged, self.fps, self.crf, self.lossless = video, staged, fps, crf, lossless
        self.out, self.reference, self.side_by_side, self.frame_png = out, reference, side_by_side, frame_png
        self.frame_index, self.max_pixels = frame_index, max_pixels
        self.writer = self.side = self.ref = None
        self.scores: list = []

    def start(self, plan) -> None:
        # (Re)start: a second plan means the first read was wrong, and everything restarts from frame 0.
        super().start(plan)
        self.close()
        self.writer = open_writer(self.staged[self.out], self.fps, self.crf, self.lossless, plan.height, plan.width)
        if self.side_by_side:
            self.side = open_writer(self.staged[self.side_by_side], self.fps, self.crf, self.lossless, plan.height,
                                     plan.width * (3 if self.reference else 2))
        self.ref = _reference_frames(self.reference, self.cut, self.max_pixels) if self.reference else None
        self.scores = []
        self.png_at = plan.frames // 2 if self.frame_index is None else min(self.frame_index, plan.frames - 1)

    def frame(self, t, frame_in, frame_out) -> None:
        self.writer.write(frame_out)
        row = [frame_in, frame_out]
        if self.ref is not None:
            ref = next(self.ref, None)
            if ref is None:
                raise EnhanceError(f"{self.reference}: ends after {t} frames; {self.video} has {self.plan.frames}")
            if ref.shape != frame_in.shape:
                raise EnhanceError(f"{self.reference}: frames are {ref.shape[1]}x{ref.shape[0]}, {self.video}'s are "
                                   f"{frame_in.shape[1]}x{frame_in.shape[0]}; expected the same size")
            self.scores.append((frame_psnr(frame_in, ref), frame_ssim(frame_in, ref),
                                frame_psnr(frame_out, ref), frame_ssim(frame_out, ref)))
            row.append(ref)
        if self.side is not None:
            self.side.write(np.ascontiguousarray(np.concatenate(row, axis=1)))
        if self.frame_png and t == self.png_at:
            _write_png(self.staged[self.frame_png], row)

    def result(self) -> None:
        if self.ref is not None and next(self.ref, None) is not None:
            raise EnhanceError(f"{self.reference}: has more frames than {self.video} ({self.plan.frames})")

    def close(self) -> None:
        for writer in (self.writer, self.side):
            if writer is not None:
                writer.close()
        self.writer = self.side = None


def enhance_video(enhancer: Enhancer, path: str, out: str, *, overlap: Optional[Tuple[int, int, int]] = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, crf: Optional[int] = None, lossless: bool = False,
                  reference: Optional[str] = None, side_by_side: Optional[str] = None,
                  frame_png: Optional[str] = None, frame_index: Optional[int] = None,
                  max_pixels: Optional[int] = None) -> EnhanceResult:
    """Enhances the video `path` into `out` (H.264); returns what was done and, with `reference`, PSNR/SSIM.

    `overlap` (T, H, W) defaults to `default_overlap`. `side_by_side` writes a
    second video, input | output (| reference); `frame_png` a PNG of frame
    `frame_index` (default: the middle one) as input | output (| reference). `crf` defaults to the
    model's kind (`default_crf`). Every output is written under a temporary name and renamed when the
    whole video is done; an output that is one of the inputs raises `outputs.OutputIsInputError` before
    any work.
    """
    from tfrecords_tools.video import DEFAULT_MAX_PIXELS, REWRITE_COLOUR, probe

    for written in (out, side_by_side, frame_png):
        outputs.check_not_input(written, [path, reference])
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    crf = default_crf(enhancer) if crf is None else crf
    overlap = tuple(overlap) if overlap is not None else default_overlap(enhancer.spec)
    cut = overlap_spec(enhancer.spec, overlap)
    started = time.perf_counter()
    info = probe(path, max_pixels)
    timing = Timing()
    with contextlib.ExitStack() as stack:
        # Renamed into place when the block ends without error, after the writers are closed.
        staged = {p: stack.enter_context(outputs.atomic_file(p)) for p in (out, side_by_side, frame_png) if p}
        head = _Enhancement(cut, overlap, path, staged, out=out, fps=info.rate, crf=crf, lossless=lossless,
                            reference=reference, side_by_side=side_by_side, frame_png=frame_png,
                            frame_index=frame_index, max_pixels=max_pixels)
        try:
            run_video(path, enhancer.spec, enhancer, head, batch_size=batch_size, cut=cut, max_pixels=max_pixels,
                      timing=timing, colour=REWRITE_COLOUR)   # written back: read so that unchanged is unchanged
        finally:
            head.close()
    plan = head.plan
    result = EnhanceResult(video=path, out=out, frames=plan.frames, height=plan.height, width=plan.width,
                           fps=info.rate, crf=None if lossless else crf, patches=timing.patches,
                           model_s=timing.model_s, reference=reference,
                           side_by_side=side_by_side, frame_png=frame_png)
    if head.scores:
        scores = np.mean(np.array(head.scores), axis=0)
        result.input_psnr, result.input_ssim, result.output_psnr, result.output_ssim = (float(v) for v in scores)
    result.seconds = time.perf_counter() - started
    return result
