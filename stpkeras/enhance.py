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
so measurements are not blurred by the output codec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from typing import Iterator, Optional, Tuple

import numpy as np

from tfrecords_tools import outputs
from tfrecords_tools.patches import PatchAssembler, overlap_spec
from tfrecords_tools.spec import PatchSpec

PIXELS = "pixels"               # serving_default output: uint8 [batch, T, H, W, 3]
PIXELS_FLOAT = "pixels_float"   # serving_default output: float32 [batch, T, H, W, 3], 0-255 units, unclipped
DEFAULT_BATCH_SIZE = 8


class EnhanceError(ValueError):
    """A model or video that cannot be enhanced as asked (not an enhancer, mismatched reference ...)."""


def default_overlap(spec: PatchSpec) -> Tuple[int, int, int]:
    """A quarter of the patch on every axis: seams vanish, and the model runs ~2.4x per pixel for 8x64x64."""
    return tuple(max(0, s // 4) for s in spec.size)  # type: ignore[return-value]


# --- the model --------------------------------------------------------------------------------


class Enhancer:
    """An enhancement model: `uint8 [batch, T, H, W, 3]` -> float32 pixels of the same shape (0-255 units)."""

    spec: PatchSpec
    source: str

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        patches = np.asarray(patches)
        if patches.dtype != np.uint8 or patches.ndim != 5 or patches.shape[1:] != self.spec.shape:
            raise EnhanceError(f"{self.source}: expected uint8 patches [batch, {', '.join(map(str, self.spec.shape))}]; "
                               f"received {patches.dtype} {list(patches.shape)}")
        return self._run(patches)

    def _run(self, patches: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class KerasEnhancer(Enhancer):
    def __init__(self, path: str, spec: Optional[PatchSpec] = None):
        import tensorflow as tf

        from stpkeras.export import RUN_FILE, RUN_MODEL, load_keras_model

        run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        model_path = path
        if os.path.isdir(path):
            model_path = next((os.path.join(path, n) for n in (RUN_MODEL, "last.keras")
                               if os.path.isfile(os.path.join(path, n))), os.path.join(path, RUN_MODEL))
        run_json = os.path.join(run_dir, RUN_FILE)
        if os.path.isfile(run_json):
            with open(run_json) as f:
                run = json.load(f)
            if run.get("task") != "enhance":
                raise EnhanceError(f"{path}: a run of task {run.get('task', 'classify')!r}; expected an enhancement model "
                                   "(stp train --task enhance)")
            spec = spec or PatchSpec.from_dict(run["spec"])
        if spec is None:
            raise EnhanceError(f"{path}: no run.json beside the model, so its PatchSpec is unknown")
        self.source = model_path
        self.spec = spec
        self.model = load_keras_model(model_path)
        if PIXELS not in [layer.name for layer in self.model.layers]:
            raise EnhanceError(f"{model_path}: no layer {PIXELS!r}; expected an enhancement model (unet3d, dncnn3d)")
        self._call = tf.function(lambda x: tf.cast(self.model(x, training=False), tf.float32), reduce_retracing=True)

    def _run(self, patches):
        return self._call(patches).numpy()


class SavedModelEnhancer(Enhancer):
    """An export of an enhancement run (`stp export`): its `serving_default` returns `pixels_float`."""

    def __init__(self, path: str):
        import tensorflow as tf

        from stpkeras.export import SERVING_DEFAULT, SPEC_ASSET, resolve_saved_model

        self.source = resolve_saved_model(path)
        with open(os.path.join(self.source, "assets", SPEC_ASSET)) as f:
            self.spec = PatchSpec.from_dict(json.load(f))
        loaded = tf.saved_model.load(self.source)
        self._loaded = loaded
        self._serve = loaded.signatures[SERVING_DEFAULT]
        if PIXELS_FLOAT not in self._serve.structured_outputs:
            raise EnhanceError(f"{self.source}: its {SERVING_DEFAULT} has no {PIXELS_FLOAT!r} output; expected "
                               "an export of an enhancement run")

    def _run(self, patches):
        from stpkeras.export import PATCHES
        return self._serve(**{PATCHES: patches})[PIXELS_FLOAT].numpy()


def load_enhancer(path: str) -> Enhancer:
    """A run folder (best.keras), a `.keras` file in its run folder, or a SavedModel export (`saved_models/NAME`)."""
    path = os.fspath(path)
    if path.endswith(".keras") or os.path.isfile(os.path.join(path, "run.json")):
        return KerasEnhancer(path)
    return SavedModelEnhancer(path)


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
    from tfrecords_tools.video import FrameStream, Replan, make_plan, probe

    info = probe(path, max_pixels)
    try:
        for frame, _ in FrameStream(info, spec, make_plan(info, spec)):
            yield frame
    except Replan as e:
        raise EnhanceError(f"{path}: the reference's frames do not decode as its container declares ({e.why}); "
                           "re-encode it") from e


def _open_writer(path: str, fps: float, crf: int, lossless: bool, height: int, width: int):
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


def enhance_video(enhancer: Enhancer, path: str, out: str, *, overlap: Optional[Tuple[int, int, int]] = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, crf: int = 18, lossless: bool = False,
                  reference: Optional[str] = None, side_by_side: Optional[str] = None,
                  frame_png: Optional[str] = None, frame_index: Optional[int] = None,
                  max_pixels: Optional[int] = None) -> EnhanceResult:
    """Enhances the video `path` into `out` (H.264); returns what was done and, with `reference`, PSNR/SSIM.

    `overlap` (T, H, W) defaults to `default_overlap`. `side_by_side` writes a
    second video, input | output (| reference); `frame_png` a PNG of frame
    `frame_index` (default: the middle one) as input | output (| reference).
    Every output is written under a temporary name and renamed when the whole video is done; an
    output that is one of the inputs raises `outputs.OutputIsInputError` before any work.
    """
    from stpkeras.predict import _prefetch
    from tfrecords_tools.patches import Patch
    from tfrecords_tools.video import DEFAULT_MAX_PIXELS, Plan, probe, video_patches

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid value for argument `batch_size`. Expected a strictly positive integer. "
                         f"Received batch_size={batch_size!r}")
    for written in (out, side_by_side, frame_png):
        outputs.check_not_input(written, [path, reference])
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    overlap = tuple(overlap) if overlap is not None else default_overlap(enhancer.spec)
    spec = overlap_spec(enhancer.spec, overlap)
    started = time.perf_counter()
    info = probe(path, max_pixels)
    result = EnhanceResult(video=path, out=out, fps=info.rate, reference=reference, side_by_side=side_by_side,
                           frame_png=frame_png)
    state: dict = {}

    def close():
        for key in ("writer", "side"):
            if state.get(key) is not None:
                state[key].close()
                state[key] = None

    def start(plan: Plan):
        # (Re)start: a second plan means the first read was wrong, and everything restarts from frame 0.
        close()
        state.update(plan=plan, out_frames=PatchAssembler(spec, overlap, plan.frames, plan.height, plan.width),
                     in_frames=PatchAssembler(spec, overlap, plan.frames, plan.height, plan.width),
                     writer=_open_writer(staged[out], info.rate, crf, lossless, plan.height, plan.width),
                     side=(_open_writer(staged[side_by_side], info.rate, crf, lossless, plan.height,
                                        plan.width * (3 if reference else 2)) if side_by_side else None),
                     ref=_reference_frames(reference, spec, max_pixels) if reference else None,
                     scores=[], pending_in={}, patches=0,
                     png_at=(plan.frames // 2 if frame_index is None else min(frame_index, plan.frames - 1)))

    def consume(frames_in, frames_out):
        for (t, inp), (t2, outp) in zip(frames_in, frames_out):
            assert t == t2, (t, t2)  # both assemblers see the same patches
            state["writer"].write(outp)
            row = [inp, outp]
            if state["ref"] is not None:
                ref = next(state["ref"], None)
                if ref is None:
                    raise EnhanceError(f"{reference}: ends after {t} frames; {path} has {state['plan'].frames}")
                if ref.shape != inp.shape:
                    raise EnhanceError(f"{reference}: frames are {ref.shape[1]}x{ref.shape[0]}, {path}'s are "
                                       f"{inp.shape[1]}x{inp.shape[0]}; expected the same size")
                state["scores"].append((frame_psnr(inp, ref), frame_ssim(inp, ref),
                                        frame_psnr(outp, ref), frame_ssim(outp, ref)))
                row.append(ref)
            if state["side"] is not None:
                state["side"].write(np.ascontiguousarray(np.concatenate(row, axis=1)))
            if frame_png and t == state["png_at"]:
                _write_png(staged[frame_png], row)

    def run_batch(batch):
        t = time.perf_counter()
        outputs = enhancer(np.stack([p.pixels for p in batch]))
        result.model_s += time.perf_counter() - t
        state["patches"] += len(batch)
        for patch, output in zip(batch, outputs):
            ins = list(state["in_frames"].add(patch.pixels, patch.offset, patch.valid))
            outs = list(state["out_frames"].add(output, patch.offset, patch.valid))
            consume(ins, outs)

    stop = threading.Event()
    batch = []
    with contextlib.ExitStack() as stack:
        # Renamed into place when the block ends without error, after the writers are closed.
        staged = {p: stack.enter_context(outputs.atomic_file(p)) for p in (out, side_by_side, frame_png) if p}
        try:
            for event in _prefetch(video_patches(path, spec, max_pixels=max_pixels), stop):
                if isinstance(event, Plan):
                    batch = []
                    start(event)
                    continue
                batch.append(event)
                if len(batch) == batch_size:
                    run_batch(batch)
                    batch = []
            if batch:
                run_batch(batch)
            consume(list(state["in_frames"].finish()), list(state["out_frames"].finish()))
            if state["ref"] is not None and next(state["ref"], None) is not None:
                raise EnhanceError(f"{reference}: has more frames than {path} ({state['plan'].frames})")
        finally:
            close()
    plan = state["plan"]
    result.frames, result.height, result.width, result.patches = plan.frames, plan.height, plan.width, state["patches"]
    if state["scores"]:
        scores = np.mean(np.array(state["scores"]), axis=0)
        result.input_psnr, result.input_ssim, result.output_psnr, result.output_ssim = (float(v) for v in scores)
    result.seconds = time.perf_counter() - started
    return result
