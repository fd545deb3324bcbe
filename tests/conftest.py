"""Shared fixtures: small real videos (made once per session with PyAV/libx264), the sample footage
in ../shared/data/videos when present, one converted folder, and a CLI runner.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# First, before any test module loads TensorFlow: the package's CPU-kernel default
# (TF_ENABLE_ONEDNN_OPTS=1, read once when TensorFlow loads) then holds in this process as in the `stp`
# subprocesses, so a run trained here and one trained by `stp train` use the same kernels, bit for bit.
import stpkeras  # noqa: F401,E402
from videos import CLASSES, PER_CLASS, VFR_PTS_MS, pattern_frames, write_timed_video, write_video

# Real footage beside the repository in a development checkout (see its README.md); a user's clone
# lacks it, so every test that needs it skips with this reason.
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
SAMPLES_MISSING = f"sample videos not found at {SAMPLES} (the ../shared/data/videos folder of a development checkout)"


@dataclasses.dataclass(frozen=True)
class Video:
    """A generated video: its file and the frames that went in (`uint8 [T, H, W, 3]`)."""

    path: str
    frames: np.ndarray
    fps: float = 25.0
    lossless: bool = False


@pytest.fixture(scope="session")
def sample():
    """`sample('tree.avi')` -> the path of a sample video, or a skip naming what is missing."""

    def get(name: str) -> str:
        path = SAMPLES / name
        if not path.is_file():
            pytest.skip(f"{name}: {SAMPLES_MISSING}" if not SAMPLES.is_dir() else f"{path} not found")
        return str(path)

    return get


@pytest.fixture(scope="session")
def benchmark_script():
    """`benchmark_script('deblur_levels')` -> the module benchmarks/deblur_levels.py (the scripts are not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def clip64(video_dir) -> Video:
    """64x64, 24 frames at 25 fps, lossy H.264 (yuv420p)."""
    frames = pattern_frames(24, 64, 64, seed=1)
    return Video(write_video(str(video_dir / "clip64.mp4"), frames), frames)


@pytest.fixture(scope="session")
def odd_clip(video_dir) -> Video:
    """50 rows x 70 columns, 20 frames, lossy H.264: no patch size divides it."""
    frames = pattern_frames(20, 50, 70, seed=2)
    return Video(write_video(str(video_dir / "odd_50x70.mp4"), frames), frames)


@pytest.fixture(scope="session")
def lossless_odd(video_dir) -> Video:
    """45 rows x 71 columns (odd), 19 frames, lossless RGB H.264: decodes to exactly `frames`."""
    frames = pattern_frames(19, 45, 71, seed=3)
    return Video(write_video(str(video_dir / "odd_45x71_lossless.mp4"), frames, lossless=True), frames,
                 lossless=True)


@pytest.fixture(scope="session")
def clip2s(video_dir) -> Video:
    """32 rows x 48 columns, 50 frames (2 s at 25 fps), lossless RGB H.264: for segments of one video."""
    frames = pattern_frames(50, 32, 48, seed=6)
    return Video(write_video(str(video_dir / "clip2s_lossless.mp4"), frames, lossless=True), frames, lossless=True)


@pytest.fixture(scope="session")
def vfr_video(video_dir) -> Video:
    """Lossless variable-frame-rate file: frame i starts at VFR_PTS_MS[i] ms (see `VFR_PTS_MS`)."""
    frames = pattern_frames(len(VFR_PTS_MS), 32, 48, seed=4)
    return Video(write_timed_video(str(video_dir / "vfr.mp4"), frames, VFR_PTS_MS), frames, fps=0.0, lossless=True)


@pytest.fixture(scope="session")
def classes_src(video_dir) -> Path:
    """A folder of class folders: CLASSES x PER_CLASS videos of 24 frames of 64x64."""
    root = video_dir / "classes"
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            write_video(str(root / name / f"{name}_{i}.mp4"), pattern_frames(24, 64, 64, seed=100 + 10 * c + i))
    return root


@pytest.fixture(scope="session")
def converted(tmp_path_factory, classes_src):
    """`classes_src` converted once with patch 4x32x32 (raw, uncompressed, 1 worker): (folder, manifest)."""
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    out = tmp_path_factory.mktemp("converted") / "data"
    manifest = convert(ConvertConfig(src=str(classes_src), out=str(out), spec=PatchSpec(4, 32, 32)))
    return out, manifest


@pytest.fixture
def converted_copy(converted, tmp_path) -> Path:
    """A private copy of `converted`'s folder, for tests that damage it."""
    out = tmp_path / "data"
    shutil.copytree(converted[0], out)
    return out


@pytest.fixture(scope="session")
def cli():
    """`cli('convert', SRC, OUT, ...)` -> click's Result (exit_code, stdout, stderr), run in-process (a new
    CliRunner each call: no state between calls, so module fixtures may use it too)."""
    from click.testing import CliRunner

    from stpkeras.cli import main

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def target_runs(tmp_path_factory):
    """(data, multi-label run, regression run): tiny runs on multi-hot and value records (`targets.py`)."""
    from targets import train_target_runs

    return train_target_runs(str(tmp_path_factory.mktemp("targets")))


@pytest.fixture(scope="session")
def causal_run(tmp_path_factory, converted):
    """A tiny causal stcnn trained by `stp train --causal` on `converted` (4x32x32 patches): its run folder."""
    from click.testing import CliRunner

    from stpkeras.cli import main

    run = tmp_path_factory.mktemp("causal") / "run"
    result = CliRunner().invoke(main, ["train", str(converted[0]), "--out", str(run), "--causal", "--model-arg",
                                       "filters=4", "--epochs", "1", "--batch-size", "8", "--augment", "none",
                                       "--seed", "0", "--verbose", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run
