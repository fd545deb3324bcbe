"""Tests of enhancement end to end: overlap-add reassembly (exact with an identity model, odd sizes, bounded
memory), `stp enhance` on real encoded videos, paired conversion (`path,target`), a short `stp train --task
enhance` that beats its noisy input, `stp evaluate` with baselines, and the export's serving signature."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from stpkeras.artifacts import load_keras_model
from stpkeras.enhance import PIXELS, PIXELS_FLOAT, enhance_video, load_enhancer
from tfrecords_tools import schema
from tfrecords_tools.patches import Grid, PatchAssembler, PatchCutter, blend_window, overlap_spec
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import VideoWriter
from videos import assert_planes_written_back, decode_all, pattern_frames, write_video, write_yuv_window


# --- overlap-add --------------------------------------------------------------------------------

@pytest.mark.parametrize("size,overlap", [(8, 0), (8, 1), (8, 2), (8, 4), (64, 16), (5, 2)])
def test_blend_windows_cross_fade_to_one_and_never_reach_zero(size, overlap):
    w = blend_window(size, overlap)
    assert w.dtype == np.float32 and np.all(w > 0) and np.all(w <= 1)
    stride = size - overlap
    if overlap:
        assert np.allclose(w[stride:] + w[:overlap], 1.0, atol=1e-6)  # neighbouring ramps sum to one
    with pytest.raises(ValueError, match="overlap"):
        blend_window(size, size // 2 + 1)


def _assemble(frames, spec, overlap, transform=lambda p: p):
    """Cuts `frames` like the enhancer does, applies `transform` per patch, reassembles; checks memory."""
    cut = overlap_spec(spec, overlap)
    t, h, w = frames.shape[:3]
    grid = Grid.for_video(cut, t, h, w)
    cutter = PatchCutter(cut, grid)
    assembler = PatchAssembler(cut, overlap, t, h, w)
    out, held = [], 0
    for i, frame in enumerate(frames):
        for patch in cutter.add(frame, float(i)):
            out += list(assembler.add(transform(patch.pixels), patch.offset, patch.valid))
            held = max(held, len(assembler._acc))
    for patch in cutter.finish():
        out += list(assembler.add(transform(patch.pixels), patch.offset, patch.valid))
    out += list(assembler.finish())
    assert [i for i, _ in out] == list(range(t))
    return np.stack([f for _, f in out]), held


@pytest.mark.parametrize("shape,overlap", [((19, 45, 71), (2, 4, 4)), ((7, 13, 9), (1, 3, 2)),
                                           ((3, 10, 10), (2, 4, 4)), ((30, 33, 17), (0, 0, 0)),
                                           ((11, 16, 16), (4, 8, 8))])
def test_identity_reassembles_exactly_on_odd_sizes(shape, overlap):
    """No seam and no darkening at the borders: an identity model gives back every pixel exactly,
    also where the frame is smaller than a patch (3 frames, 10x10 for 8x16x16 patches)."""
    frames = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out, held = _assemble(frames, PatchSpec(8, 16, 16), overlap)
    assert np.array_equal(out, frames)
    assert held <= 8  # about one patch length of frames in memory, whatever the video's length
    # Float outputs off by < 0.5 round back; a constant shift is kept everywhere (no border effects).
    out, _ = _assemble(frames, PatchSpec(8, 16, 16), overlap, lambda p: p.astype(np.float32) + 0.4)
    assert np.array_equal(out, frames)
    flat = np.full((*shape, 3), 100, np.uint8)
    out, _ = _assemble(flat, PatchSpec(8, 16, 16), overlap, lambda p: p.astype(np.float32) + 7)
    assert np.all(out == 107)


def test_overlap_spec_checks_its_range():
    with pytest.raises(ValueError, match="overlap"):
        overlap_spec(PatchSpec(8, 16, 16), (5, 4, 4))
    assert overlap_spec(PatchSpec(8, 16, 16, fps=10, short_side=32), (2, 4, 4)).stride == (6, 12, 12)


# --- whole videos ---------------------------------------------------------------------------------

def _identity_run(root, spec):
    """A run folder holding an untrained dncnn3d: its residual layer is zero-initialised, so it returns its input."""
    from stpkeras.models import build_model

    os.makedirs(root, exist_ok=True)
    build_model("dncnn3d", spec, 3, depth=2, filters=4).save(os.path.join(root, "best.keras"))
    with open(os.path.join(root, "run.json"), "w") as f:
        json.dump({"task": "enhance", "spec": spec.to_dict(), "labels": [], "model": "dncnn3d"}, f)
    return str(root)


def test_enhance_video_with_an_identity_model_gives_back_the_input(tmp_path, lossless_odd, cli):
    run = _identity_run(tmp_path / "run", PatchSpec(4, 16, 16))
    out = str(tmp_path / "out.mp4")
    result = enhance_video(load_enhancer(run), lossless_odd.path, out, lossless=True, reference=lossless_odd.path,
                           batch_size=5, side_by_side=str(tmp_path / "sbs.mp4"), frame_png=str(tmp_path / "f.png"))
    decoded, times = decode_all(out)
    assert np.array_equal(decoded, lossless_odd.frames)  # 19 frames of 45x71, exact
    assert (result.frames, result.height, result.width, result.fps) == (19, 45, 71, 25.0)
    assert times[1] - times[0] == pytest.approx(1 / 25)
    assert result.output_psnr == result.input_psnr == 100.0 and result.output_ssim == pytest.approx(1.0)
    sbs, _ = decode_all(str(tmp_path / "sbs.mp4"))
    assert sbs.shape == (19, 45, 71 * 3, 3)
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png"))[:, 71:142], lossless_odd.frames[9])

    # The CLI, with another overlap and lossy output: same frame count, close to the input.
    r = cli("enhance", run, lossless_odd.path, "--out", tmp_path / "cli.mp4", "--overlap", "1x5x3",
            "--reference", lossless_odd.path, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["frames"] == 19 and got["output_psnr"] == 100.0
    assert decode_all(str(tmp_path / "cli.mp4"))[0].shape == lossless_odd.frames.shape
    r = cli("enhance", run, lossless_odd.path, "--out", tmp_path / "x.mp4", "--overlap", "3x5x3")
    assert r.exit_code == 2 and "overlap" in r.output


def test_enhance_writes_an_unchanged_pixel_back_as_it_was(tmp_path, sample, cli):
    """An identity model through `stp enhance` gives back a real YUV video's own luma and chroma. Read with
    FFmpeg's fast converter (the conversion's default) and written back by the encoder's formula, every pixel
    of bikes.mp4 came out 1.2 grey levels darker in luma: a bias a restoration of +0.1 dB cannot afford."""
    rows, cols = 64, 96
    source = write_yuv_window(str(tmp_path / "bikes_yuv.mp4"), sample("bikes.mp4"), 12, rows, cols)
    run = _identity_run(tmp_path / "run", PatchSpec(4, 16, 16))
    r = cli("enhance", run, source, "--out", tmp_path / "out.mp4", "--crf", "0")
    assert r.exit_code == 0, r.output
    assert_planes_written_back(source, str(tmp_path / "out.mp4"), 12, rows)


def test_enhance_refuses_a_mismatched_reference_and_a_classifier(tmp_path, lossless_odd, clip64, cli):
    run = _identity_run(tmp_path / "run", PatchSpec(4, 16, 16))
    r = cli("enhance", run, lossless_odd.path, "--out", tmp_path / "o.mp4", "--reference", clip64.path)
    assert r.exit_code == 2 and "expected the same size" in r.output
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump({"task": "classify", "spec": PatchSpec(4, 16, 16).to_dict(), "labels": ["a", "b"]}, f)
    r = cli("enhance", run, lossless_odd.path, "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "expected an enhancement model" in r.output


# --- paired conversion ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """clean.mp4 (lossless) and bad.mp4 (H.264 at crf 40), 16 frames of 40x48; plus mismatched pairs."""
    root = tmp_path_factory.mktemp("pairs")
    clean = pattern_frames(16, 40, 48, seed=5)
    write_video(str(root / "clean.mp4"), clean, lossless=True)
    with VideoWriter(str(root / "bad.mp4"), 25, crf=40) as w:
        for frame in clean:
            w.write(frame)
    for name in ("short_pair.mp4", "small_pair.mp4"):
        shutil.copy(root / "bad.mp4", root / name)
    write_video(str(root / "short.mp4"), clean[:12], lossless=True)
    write_video(str(root / "small.mp4"), np.ascontiguousarray(clean[:, :32, :32]), lossless=True)
    (root / "pairs.csv").write_text("path,target\nbad.mp4,clean.mp4\nshort_pair.mp4,short.mp4\n"
                                    "small_pair.mp4,small.mp4\n")
    return root, clean


def test_convert_pairs_writes_aligned_targets_and_fails_mismatched_pairs(pairs, tmp_path, cli):
    root, clean = pairs
    r = cli("convert", root / "pairs.csv", tmp_path / "data", "--patch", "4x16x16", "--quiet")
    assert r.exit_code == 1  # two pairs failed
    manifest = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert manifest["paired"] is True and manifest["counts"]["ok"] == 1
    reasons = {v["id"]: v["reason"] for v in manifest["videos"]}
    assert "has 12 frames under the video's timing, the video 16" in reasons["short_pair.mp4"]
    assert "has frames of 32x32, the video 48x40" in reasons["small_pair.mp4"]
    shard = tmp_path / "data" / manifest["splits"]["train"]["shards"][0]["file"]
    records = [schema.parse_patch_numpy(r.numpy()) for r in tf.data.TFRecordDataset(str(shard))]
    assert len(records) == 4 * 2 * 3
    for rec in records:
        t, y, x = rec[schema.OFFSET]
        assert np.array_equal(rec[schema.TARGET], clean[t:t + 4, y:y + 16, x:x + 16])  # lossless: exact
        assert np.abs(rec[schema.PATCH].astype(int) - rec[schema.TARGET]).mean() > 0.5  # crf 40: degraded


def test_paired_data_trains_at_a_fifth_of_the_default_rate_and_a_given_rate_is_kept(pairs, tmp_path, cli,
                                                                                   monkeypatch):
    import stpkeras.setup as setup
    monkeypatch.setattr(setup, "cpu_cores", lambda: 2)   # the CPU-budget recipe applies, on any test machine
    monkeypatch.setattr(setup, "has_gpu", lambda: False)
    root, _ = pairs
    cli("convert", root / "pairs.csv", tmp_path / "data", "--patch", "4x16x16", "--quiet")
    # deblock=0: no deblocking stage to tune at the end (tests/test_codec.py tests it), for time.
    common = ("--task", "enhance", "--model-arg", "depth=2", "--model-arg", "filters=4", "--model-arg", "deblock=0",
              "--epochs", "1", "--batch-size", "8", "--verbose", "0", "--seed", "0")
    runs = {"default": (), "given": ("--lr", "1e-3")}
    for name, args in runs.items():
        r = cli("train", tmp_path / "data", "--out", tmp_path / name, *common, *args)
        assert r.exit_code == 0, r.output
    default, given = (json.loads((tmp_path / n / "run.json").read_text())["config"] for n in runs)
    # Codec pairs differ by a few grey levels: the task's 2e-3 x 0.2, and run.json says why.
    assert default["lr"] == pytest.approx(4e-4) and default["lr_default"] is True
    assert default["recipe"] == "lr 0.002 x 0.2 = 0.0004 on paired data (--lr chooses otherwise)"
    assert given["lr"] == 1e-3 and given["lr_default"] is False and given["recipe"] is None
    # The CPU-budget recipe's rate (its crop and lr for a short --minutes, no GPU) is scaled the same way.
    r = cli("train", tmp_path / "data", "--out", tmp_path / "budget", "--task", "enhance", "--minutes", "0.05",
            "--epochs", "1", "--batch-size", "8", "--verbose", "0")
    assert r.exit_code == 0, r.output
    budget = json.loads((tmp_path / "budget" / "run.json").read_text())["config"]
    assert budget["lr"] == pytest.approx(2e-4) and budget["recipe"].startswith("CPU-budget defaults: crop=32, lr 0.001")
    assert budget["recipe"].endswith("; lr 0.001 x 0.2 = 0.0002 on paired data (--lr chooses otherwise)")
    assert "lr 0.001 x 0.2 = 0.0002 on paired data" in r.output   # the run's first line says so
    # `stp enhance` writes a model trained on pairs (a restoration, tenths of a dB) at crf 10 unless told otherwise:
    # libx264's own record of its settings in the written file says so.
    for args, crf in (((), 10), (("--crf", "23"), 23)):
        out = tmp_path / f"restored{crf}.mp4"
        r = cli("enhance", tmp_path / "default", root / "bad.mp4", "--out", out, *args)
        assert r.exit_code == 0, r.output
        assert f"(crf {crf})" in r.output and x264_crf(out) == crf


def x264_crf(path) -> float:
    """The crf libx264 wrote `path` at, from the settings it records in the stream (`crf=10.0`)."""
    found = re.search(rb"crf=(\d+(?:\.\d+)?)", Path(path).read_bytes())
    assert found, f"{path}: no libx264 settings"
    return float(found.group(1))


# --- training, evaluation, export -----------------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """Three generated videos (64x64, 24 frames) converted to 4x32x32 patches (one video held out as 'test'),
    and a dncnn3d (the default enhancer) trained on them with Gaussian noise sigma 25 by `stp train --task enhance`."""
    from click.testing import CliRunner

    from stpkeras.cli import main

    root = tmp_path_factory.mktemp("enhance")
    lines = ["path,split"]
    for i, split in enumerate(("train", "train", "test")):
        write_video(str(root / f"v{i}.mp4"), pattern_frames(24, 64, 64, seed=40 + i))
        lines.append(f"v{i}.mp4,{split}")
    (root / "videos.csv").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(root / "videos.csv"), str(root / "data"), "--patch", "4x32x32",
                             "--stride", "2x16x16", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["train", str(root / "data"), "--out", str(root / "run"), "--task", "enhance",
                             "--model-arg", "depth=4", "--model-arg", "filters=16",  # dncnn3d: the default
                             "--degrade", "noise:25", "--epochs", "12", "--batch-size", "16", "--lr", "3e-3",
                             "--augment", "none", "--val-split", "test", "--seed", "0", "--verbose", "0"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return root


def test_short_training_beats_its_noisy_input_and_evaluate_reports_baselines(noisy_run, cli):
    run = json.loads((noisy_run / "run" / "run.json").read_text())
    assert run["task"] == "enhance" and run["config"]["task_options"] == {"crop": 0, "degrade": ["noise:25"],
                                                                           "pixel_loss": "l1", "soften": None}
    assert run["task_options"]["soften"] == 0.5   # the task's default on self-supervised rgb data
    assert run["config"]["model"] == "dncnn3d" and run["config"]["warmup"] == 0.05  # the defaults of --task enhance
    r = cli("evaluate", noisy_run / "run", noisy_run / "data", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["split"] == "test" and result["degrade"] == ["noise:25"]
    assert 19 < result["input"]["psnr"] < 22  # sigma 25 on 0-255: about 20.2 dB
    assert result["output"]["psnr"] > result["input"]["psnr"] + 3  # +4.5 dB after these 12 short epochs
    assert result["output"]["ssim"] > result["input"]["ssim"]
    assert {"gaussian3d", "median3", "median5"} <= set(result["baselines"])
    assert all(v["psnr"] > result["input"]["psnr"] for v in result["baselines"].values())
    # The same seed gives the same degraded inputs.
    again = json.loads(cli("evaluate", noisy_run / "run", noisy_run / "data", "--json", "--no-baselines").output)
    assert again["input"] == result["input"] and again["output"] == result["output"]
    r = cli("evaluate", noisy_run / "run", noisy_run / "data", "--no-baselines")
    assert r.exit_code == 0 and "model gain:" in r.output


def test_blur_is_measured_against_sharpeners_tuned_on_the_split(noisy_run, cli):
    # A blur is not undone by a denoiser: the baselines are unsharp masking and Wiener deconvolution
    # (scikit-image), each with its parameters chosen on the split; Wiener finds the blur's own sigma.
    r = cli("evaluate", noisy_run / "run", noisy_run / "data", "--degrade", "blur:1.5", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["degrade"] == ["blur:1.5"] and set(result["baselines"]) == {"unsharp", "wiener"}
    assert "baselines_missing" not in result
    sigma, balance = result["baselines"]["wiener"]["param"]
    assert 1.25 <= sigma <= 1.75, result["baselines"]["wiener"]
    for name, v in result["baselines"].items():
        assert v["psnr"] > result["input"]["psnr"] + 1, (name, v, result["input"])
    assert result["best_baseline"] in ("unsharp", "wiener")
    r = cli("evaluate", noisy_run / "run", noisy_run / "data", "--degrade", "blur:1.5")
    assert r.exit_code == 0 and f"{sigma:g},{balance:g}" in r.output, r.output   # the tuple parameter, printed


def test_deblur_levels_benchmark_measures_the_detail_each_restorer_puts_back(noisy_run, tmp_path, benchmark_script):
    """benchmarks/deblur_levels.py (its figures are on the benchmarks page): per level, PSNR and the share of the
    clean patches' fine detail kept by the blurred input, the tuned Wiener filter and each run's model."""
    bench = benchmark_script("deblur_levels")
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8)
    assert bench.detail(x) > 0 and bench.detail(np.full_like(x, 7)) == 0
    result = bench.main([str(noisy_run / "data"), str(noisy_run / "run"), "--levels", "1,2", "--patches", "8",
                         "--out", str(tmp_path / "levels.json")])
    assert json.loads((tmp_path / "levels.json").read_text()) == result
    one, two = result["levels"]
    assert [one["level"], two["level"]] == [1.0, 2.0]
    for row in (one, two):
        wiener = next(k for k in row["psnr"] if k.startswith("wiener "))
        assert row["detail"]["input"] < 0.9 and row["detail"][wiener] > row["detail"]["input"] + 0.05, row
        assert row["psnr"][wiener] > row["psnr"]["input"] + 1, row
        assert str(noisy_run / "run") in row["psnr"]   # the (denoising) model measured beside them
    assert two["detail"]["input"] < one["detail"]["input"] - 0.1, result   # a wider blur keeps less
    assert one["wiener_param"][0] < two["wiener_param"][0]   # and Wiener finds a wider PSF for it


def test_evaluate_loads_an_enhance_run_in_a_fresh_process(noisy_run):
    """`stp evaluate RUN` in a new process: the run's .keras names the PSNR/SSIM metrics, which must be
    registered before the load (in-process tests had them imported by training)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "stpkeras.cli", "evaluate", str(noisy_run / "run"),
                           str(noisy_run / "data"), "--json", "--no-baselines"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout)
    assert fresh["output"]["psnr"] > fresh["input"]["psnr"] + 1.0


def test_evaluate_measures_a_lone_enhancer_file_as_its_run(noisy_run, tmp_path, cli):
    """A `.keras` enhancer away from its run folder (no run.json: its output layer 'pixels' says what it is) is
    measured as an enhancer, with `--degrade` for what its run.json would have said; once it was taken for a
    classifier of the data's 0 classes."""
    shutil.copy(noisy_run / "run" / "best.keras", tmp_path / "denoiser.keras")
    results = []
    for i, model in enumerate((noisy_run / "run", tmp_path / "denoiser.keras")):
        r = cli("evaluate", model, noisy_run / "data", "--degrade", "noise:25", "--no-baselines", "--json",
                "--out", tmp_path / f"eval{i}")
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.output))
    run, lone = results
    assert lone["output"] == run["output"] and lone["input"] == run["input"]
    assert lone["output"]["psnr"] > lone["input"]["psnr"] + 1.0


def test_tta_averages_the_pixels_over_four_flips_and_helps_a_trained_denoiser(noisy_run, tmp_path, cli):
    """`--tta` on an enhancer (`augment.flip_averaged_pixels`): each patch's pixels are the mean of the model's
    over the patch and its flips left-right, top-bottom and in time (8 passes), each flipped back, so the answer
    is exactly symmetric; on the held-out video it denoises better than one pass. An export refuses it."""
    import itertools

    plain, flipped = load_enhancer(str(noisy_run / "run")), load_enhancer(str(noisy_run / "run"), tta=True)
    x = np.random.default_rng(1).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    flips = [axes for n in range(4) for axes in itertools.combinations((1, 2, 3), n)]
    assert len(flips) == 8
    expected = np.mean([np.flip(plain(np.flip(x, axis=a).copy()), axis=a) for a in flips], axis=0)
    got = flipped(x)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert np.abs(got - plain(x)).max() > 0.5   # a trained model is not symmetric: the average differs
    for axes in ((1,), (2, 3)):
        np.testing.assert_allclose(flipped(np.flip(x, axis=axes).copy()), np.flip(got, axis=axes), atol=2e-3)

    # The CLI on the held-out video with noise: both beat the noisy input, the average by more.
    clean = decode_all(str(noisy_run / "v2.mp4"))[0]
    noisy = np.clip(np.rint(clean + np.random.default_rng(0).normal(0, 25, clean.shape)), 0, 255).astype(np.uint8)
    with VideoWriter(str(tmp_path / "noisy.mp4"), 25, lossless=True) as w:
        for frame in noisy:
            w.write(frame)
    with VideoWriter(str(tmp_path / "clean.mp4"), 25, lossless=True) as w:
        for frame in clean:
            w.write(frame)
    got = {}
    for flag in ((), ("--tta",)):
        r = cli("enhance", noisy_run / "run", tmp_path / "noisy.mp4", "--out", tmp_path / f"o{len(flag)}.mp4",
                "--reference", tmp_path / "clean.mp4", "--lossless", "--json", *flag)
        assert r.exit_code == 0, r.output
        got[flag] = json.loads(r.output)
    one, four = got[()], got[("--tta",)]
    assert one["output_psnr"] > one["input_psnr"] + 3 and one["crf"] is None   # lossless
    # A model trained on its own degradations (not pairs) is written at crf 18 by default.
    r = cli("enhance", noisy_run / "run", tmp_path / "noisy.mp4", "--out", tmp_path / "default.mp4")
    assert r.exit_code == 0 and "(crf 18)" in r.output and x264_crf(tmp_path / "default.mp4") == 18, r.output
    assert four["output_psnr"] > one["output_psnr"] + 0.05
    r = cli("evaluate", noisy_run / "run", noisy_run / "data", "--json", "--no-baselines", "--tta")
    assert r.exit_code == 0, r.output
    evaluated = json.loads(r.output)
    assert evaluated["tta"] is True and evaluated["output"]["psnr"] > evaluated["input"]["psnr"] + 3

    r = cli("export", noisy_run / "run", "--name", "denoise", "--out", tmp_path / "saved")
    assert r.exit_code == 0, r.output
    r = cli("enhance", tmp_path / "saved" / "denoise", tmp_path / "noisy.mp4", "--out", tmp_path / "x.mp4", "--tta")
    assert r.exit_code == 2 and "--tta runs the flips in this process" in r.output
    assert not (tmp_path / "x.mp4").exists()
    # `stp export --tta` serves the same average: the SavedModel's pixels are the 8 passes' mean.
    r = cli("export", noisy_run / "run", "--name", "denoise-tta", "--out", tmp_path / "saved", "--tta")
    assert r.exit_code == 0 and "test-time flips: h, v, t (8 passes a patch)" in r.output, r.output
    served = tf.saved_model.load(str(tmp_path / "saved" / "denoise-tta" / "1")).signatures["serving_default"]
    np.testing.assert_allclose(served(patches=tf.constant(x))["pixels_float"].numpy(), flipped(x), atol=2e-3)
    r = cli("evaluate", tmp_path / "saved" / "denoise-tta", noisy_run / "data", "--json", "--no-baselines",
            "--out", tmp_path / "e-tta")
    assert r.exit_code == 0, r.output
    served_scores = json.loads(r.output)   # the export's figures are the run's with --tta
    assert served_scores["tta"] is True
    assert served_scores["output"]["psnr"] == pytest.approx(evaluated["output"]["psnr"], abs=1e-3)


def test_export_serves_uint8_and_float_pixels(noisy_run, tmp_path, cli):
    import keras

    r = cli("export", noisy_run / "run", "--name", "denoise", "--out", tmp_path / "saved")
    assert r.exit_code == 0, r.output
    loaded = tf.saved_model.load(str(tmp_path / "saved" / "denoise" / "1"))
    serve = loaded.signatures["serving_default"]
    # The package's loader: float32 whatever the run trained in (bfloat16 on a CPU with AMX), as the export.
    model = load_keras_model(str(noisy_run / "run" / "best.keras"))
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    trained_in = json.load(open(noisy_run / "run" / "run.json"))["precision"]
    as_saved = keras.saving.load_model(str(noisy_run / "run" / "best.keras"), compile=False)
    assert trained_in in {layer.dtype_policy.name for layer in as_saved.layers}   # what the loader changes
    rng = np.random.default_rng(0)
    for batch in (3, 1):
        x = rng.integers(0, 256, (batch, 4, 32, 32, 3), dtype=np.uint8)
        out = serve(patches=tf.constant(x))
        expected = model(x).numpy()
        assert out[PIXELS].dtype == tf.uint8 and out[PIXELS].shape == x.shape
        assert np.allclose(out[PIXELS_FLOAT].numpy(), expected, atol=1e-3)
        # uint8 is the float output clipped and rounded (half to even, as np.rint); the Keras model agrees
        # up to float noise, which can move a value at .5 to the other side.
        as_uint8 = np.clip(np.rint(out[PIXELS_FLOAT].numpy()), 0, 255).astype(np.uint8)
        assert np.array_equal(out[PIXELS].numpy(), as_uint8)
        assert np.abs(as_uint8.astype(int) - np.clip(np.rint(expected), 0, 255)).max() <= 1
    # The export enhances whole videos too.
    enhancer = load_enhancer(str(tmp_path / "saved" / "denoise"))
    assert enhancer.spec.shape == (4, 32, 32, 3)
    # `stp evaluate` measures the export through its serving signature: the run's figures.
    got = {}
    for name, source in (("export", tmp_path / "saved" / "denoise"), ("run", noisy_run / "run")):
        r = cli("evaluate", source, noisy_run / "data", "--json", "--no-baselines", "--out", tmp_path / f"e-{name}")
        assert r.exit_code == 0, r.output
        got[name] = json.loads(r.output)
    assert got["export"]["output"]["psnr"] == pytest.approx(got["run"]["output"]["psnr"], abs=1e-3)
    assert got["export"]["output"]["psnr"] > got["export"]["input"]["psnr"] + 3


# --- models -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dilation,factorize,reach", [(1, 0, 5), (3, 0, 9), (1, 1, 5)])
def test_dilation_widens_what_each_output_pixel_sees(dilation, factorize, reach):
    """dncnn3d `dilation`: the middle layers' taps spaced 1, 2, 3, 2, 1 at depth 5 (IRCNN's schedule), so one
    input pixel moves the output up to 1 + 2 + 3 + 2 + 1 = 9 pixels away in height and width (5 without), and
    in time still 5 frames (the time axis is not dilated). `factorize` (each hidden layer as 1x3x3 in space,
    then 3x1x1 in time) sees as far as the full 3x3x3 layers."""
    import keras

    from stpkeras.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("dncnn3d", PatchSpec(12, 32, 32), 3, depth=5, filters=4, dilation=dilation,
                        factorize=factorize)
    name = "conv{}_space" if factorize else "conv{}"
    rates = [model.get_layer(name.format(i)).dilation_rate for i in range(1, 5)]
    if factorize:
        assert [model.get_layer(f"conv{i}_space").kernel_size for i in (1, 4)] == [(1, 3, 3)] * 2
        assert [model.get_layer(f"conv{i}_time").kernel_size for i in (1, 4)] == [(3, 1, 1)] * 2
        # The 4 hidden layers' 27 taps of 3->4 and 3x 4->4 (1,620 weights) become 9 taps of the same (540) and
        # 3 taps of 4->4 four times (192), with 4 more biases each (16)
        full = build_model("dncnn3d", PatchSpec(12, 32, 32), 3, depth=5, filters=4).count_params()
        assert model.count_params() == full - 1620 + 540 + 192 + 16
        with pytest.raises(ValueError, match="Expected 0 .* or 1 .*Received factorize=2"):
            build_model("dncnn3d", PatchSpec(12, 32, 32), 3, factorize=2)
    assert rates == ([(1, 1, 1)] * 4 if dilation == 1 else [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 2, 2)])
    model.get_layer("residual").set_weights([np.full_like(w, 0.05) for w in model.get_layer("residual").get_weights()])
    x = np.full((1, 12, 32, 32, 3), 128, np.uint8)
    bumped = x.copy()
    bumped[0, 6, 16, 16] = 255
    moved = np.abs(np.asarray(model(bumped)) - np.asarray(model(x))).max(axis=-1)[0] > 1e-4
    t, h, w = np.nonzero(moved)
    assert (h.min(), h.max(), w.min(), w.max()) == (16 - reach, 16 + reach, 16 - reach, 16 + reach)
    assert (t.min(), t.max()) == (1, 11)   # 5 layers of 3 frames: 5 frames each way


@pytest.mark.parametrize("name,options", [("unet3d", {"filters": (4, 8, 16)}), ("dncnn3d", {"depth": 3, "filters": 4}),
                                          ("dncnn3d", {"depth": 3, "filters": 4, "downscale": 2}),
                                          ("dncnn3d", {"depth": 3, "filters": 4, "downscale": 4})])
def test_enhancers_start_as_the_identity_and_round_trip(name, options, tmp_path):
    import keras

    from stpkeras.models import build_model
    from stpkeras.models.layers import Normalize

    spec = PatchSpec(4, 16, 16)
    model = build_model(name, spec, 3, **options)
    assert model.input.dtype == "uint8" and isinstance(model.layers[1], Normalize)
    # dncnn3d is fully convolutional (with its phase split too): height and width left open.
    any_size = name == "dncnn3d"
    expected = (None, 4, None, None, 3) if any_size else (None, *spec.shape)
    assert model.get_layer("pixels").dtype == "float32" and tuple(model.output.shape) == expected
    assert tuple(model.input.shape) == expected
    x = np.random.default_rng(0).integers(0, 256, (2, *spec.shape), dtype=np.uint8)
    assert np.array_equal(np.asarray(model(x)), x.astype(np.float32))  # zero residual: exactly the input
    weights = [w + 0.01 for w in model.get_weights()]
    model.set_weights(weights)
    y = np.asarray(model(x))
    model.save(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(np.asarray(keras.models.load_model(str(tmp_path / "m.keras"))(x)), y, rtol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        build_model(name, spec, 5, **options)
    if name == "dncnn3d":
        # The ReLU layers start from He initialisation (std sqrt(2 / fan-in)), not Keras's Glorot (sqrt(1 / fan-in)
        # here): with Glorot short runs stayed near the identity (docs/benchmarks.md, Enhancement).
        fresh = build_model(name, spec, 3, **{**options, "filters": 16})
        kernel = np.asarray(fresh.get_layer("conv2").kernel)
        fan_in = int(np.prod(kernel.shape[:-1]))
        np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / fan_in), rtol=0.1)
    f = options.get("downscale", 1)
    if f > 1:
        # The phases are the frame's f x f blocks as channels: a residual in one output channel of the last layer
        # (phase row 1, column 0, green) moves only the pixels of rows 1 mod f and columns 0 mod f, green only.
        phases = model.get_layer("to_phases").output
        assert tuple(phases.shape) == (None, 4, None, None, 3 * f * f)
        assert tuple(model.get_layer("to_phases")(x).shape) == (2, 4, 16 // f, 16 // f, 3 * f * f)
        w = [np.zeros_like(v) for v in model.get_layer("residual").get_weights()]
        w[1][f * 3 + 1] = 1.0
        model.get_layer("residual").set_weights(w)
        for size in (16, 32):     # the patch, and frames of another size
            frames = np.random.default_rng(1).integers(0, 256, (1, 4, size, size, 3), dtype=np.uint8)
            moved = np.asarray(model(frames)) != frames
            assert moved[:, :, 1::f, 0::f, 1].all() and moved.sum() == moved[:, :, 1::f, 0::f, 1].size
        with pytest.raises(ValueError, match="downscale"):
            build_model(name, PatchSpec(4, 16 + f // 2, 16), 3, **options)
    if name == "unet3d":
        with pytest.raises(ValueError, match="divisible by 8"):
            build_model(name, PatchSpec(4, 20, 20), 3, filters=(4, 8, 16, 32))


def test_a_run_checks_its_model_and_warns_when_it_stayed_the_identity(noisy_run, cli, tmp_path):
    """The end of an enhance run measures the model on validation patches (run.json's `check`); a run that
    never left the identity it starts at (here: a learning rate too small to move it) says so in a warning line
    and in run.json, as does a model whose output is worse than its input."""
    from stpkeras.models import build_model
    from stpkeras.pipeline import load_info
    from stpkeras.tasks import get_task

    trained = json.loads((noisy_run / "run" / "run.json").read_text())["check"]
    assert trained["split"] == "test" and trained["patches"] == 32 and trained["warning"] is None
    assert 19 < trained["input_psnr"] < 22 and trained["output_psnr"] > trained["input_psnr"] + 3
    assert trained["residual_spread"] > 5     # sigma 25 noise taken out: the residual follows the noise

    r = cli("train", noisy_run / "data", "--out", tmp_path / "stuck", "--task", "enhance", "--degrade", "noise:25",
            "--model-arg", "depth=3", "--model-arg", "filters=4", "--lr", "1e-12", "--epochs", "1",
            "--steps-per-epoch", "2", "--verbose", "0")
    assert r.exit_code == 0, r.output
    assert "warning: the model returns its input: on 32 training patches" in r.output
    check = json.loads((tmp_path / "stuck" / "run.json").read_text())["check"]
    assert check["residual_spread"] < 1e-3 and check["output_psnr"] == pytest.approx(check["input_psnr"], abs=1e-3)

    info = load_info(str(noisy_run / "data"))
    task = get_task("enhance", {"degrade": ("noise:25",)}).for_data(info)
    model = build_model("dncnn3d", info.spec, 3, depth=3, filters=4)
    residual = model.get_layer("residual")
    kernel, bias = residual.get_weights()
    residual.set_weights([kernel, np.array([0.02, -0.01, 0.03], np.float32)])   # one value per channel: silent
    check = task.check_model(model, info, "test")
    assert check["residual_spread"] < 1e-3 and check["output_psnr"] < check["input_psnr"]
    assert check["warning"].startswith("the model returns its input: on 32 patches of 'test'")
    residual.set_weights([np.random.default_rng(0).normal(0, 0.3, kernel.shape).astype(np.float32), bias])
    check = task.check_model(model, info, "test")
    assert check["residual_spread"] > 1 and check["warning"].startswith(
        "the model's output is further from the clean patches than its input")


def test_train_enhance_needs_degradations_or_pairs(noisy_run, cli, tmp_path):
    r = cli("train", noisy_run / "data", "--out", tmp_path / "a", "--task", "enhance")
    assert r.exit_code == 2 and "pass --degrade KIND:PARAM" in r.output
    r = cli("train", noisy_run / "data", "--out", tmp_path / "b", "--degrade", "noise:25")
    assert r.exit_code == 2 and "options of --task enhance" in r.output
    r = cli("train", noisy_run / "data", "--out", tmp_path / "c", "--task", "enhance", "--degrade", "fog:3")
    assert r.exit_code == 2 and "Expected a kind" in r.output
    r = cli("train", noisy_run / "data", "--out", tmp_path / "d", "--task", "enhance", "--degrade", "noise:25",
            "--model", "stcnn")
    assert r.exit_code == 2 and "Task enhance needs one of" in r.output


def test_stp_train_on_a_short_cpu_budget_trains_on_crops_and_says_why(noisy_run, cli, tmp_path):
    """The README's command (`--minutes`, nothing about the model) on CPUs: the default dncnn3d on 32x32 crops at
    lr 1e-3 (in float32, batches of 2), the line that says so in the log, and run.json holding both the values and
    the reason; `--crop 0` keeps whole patches."""
    from stpkeras.setup import has_gpu
    if has_gpu():
        pytest.skip("a GPU is visible: the task's own defaults apply")
    args = ("train", noisy_run / "data", "--task", "enhance", "--degrade", "noise", "--minutes", "0.05", "--epochs",
            "1", "--steps-per-epoch", "2", "--verbose", "0", "--no-mixed-precision")
    r = cli(*args, "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert "CPU-budget defaults: crop=32, batch size 2 in float32, lr 0.001 (no GPU, 0.05 min x" in r.output
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["model_options"] == {} and run["config"]["lr"] == 1e-3 and run["config"]["batch_size"] == 2
    assert run["config"]["task_options"]["crop"] == 32 and run["task_options"]["crop"] == 32
    assert run["config"]["recipe"].startswith("CPU-budget defaults") and run["params"] == 88259   # the default stack
    r = cli(*args, "--crop", "0", "--out", tmp_path / "whole")
    assert r.exit_code == 0, r.output
    assert "CPU-budget defaults: batch size 2 in float32, lr 0.001 (no GPU" in r.output
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["task_options"]["crop"] == 0


def test_a_run_without_a_task_is_named_as_the_classifier_it_is(tmp_path, lossless_odd, cli):
    run = _identity_run(tmp_path / "run", PatchSpec(4, 16, 16))
    with open(os.path.join(run, "run.json"), "w") as f:  # runs from before --task have no "task"
        json.dump({"spec": PatchSpec(4, 16, 16).to_dict(), "labels": ["a", "b"]}, f)
    r = cli("enhance", run, lossless_odd.path, "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "a run of task 'classify'; expected an enhancement model" in r.output
    assert "None" not in r.output


def test_a_pixel_phase_enhancer_exports_and_serves_any_batch(noisy_run, tmp_path, cli):
    """`downscale` 4 (layers.PixelPhases reshapes with sizes known only at the call) survives `.keras` and
    the SavedModel that TF Serving loads, and gives the same pixels."""
    from stpkeras.models import build_model

    model = build_model("dncnn3d", PatchSpec(4, 32, 32), 3, depth=3, filters=8, downscale=4)
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(str(tmp_path / "phases.keras"))
    r = cli("export", tmp_path / "phases.keras", "--data", noisy_run / "data", "--name", "deblock", "--out",
            tmp_path / "saved")
    assert r.exit_code == 0, r.output
    serve = tf.saved_model.load(str(tmp_path / "saved" / "deblock" / "1")).signatures["serving_default"]
    for batch in (2, 1):
        x = rng.integers(0, 256, (batch, 4, 32, 32, 3), dtype=np.uint8)
        expected = np.asarray(model(x))
        assert np.abs(expected - x).max() > 1     # the residual is not zero
        np.testing.assert_allclose(serve(patches=tf.constant(x))[PIXELS_FLOAT].numpy(), expected, atol=1e-3)
    # A fresh process loads the .keras file in plain Keras once stpkeras is imported (saving.DEFINED_IN).
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, stpkeras, keras; m = keras.saving.load_model(sys.argv[1]); "
            "np.save(sys.argv[3], np.asarray(m(np.load(sys.argv[2]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "phases.keras"), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-3)
