"""CLI stage: `stp` lists its commands, `inspect` says what a converted folder holds, `preview` draws the
patches it samples, and bad options are usage errors (exit 2).
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from stpkeras import __version__
from tfrecords_tools import manifest as mf
from tfrecords_tools import schema
from test_verify import SHARD, record_starts
from videos import CLASSES, PER_CLASS


def test_help_lists_every_command(cli):
    from stpkeras.cli import main

    result = cli("--help")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for name in ("convert", "inspect", "verify", "preview", "demo", *main.commands):
        assert any(line.split()[:1] == [name] for line in lines), f"{name} missing from stp --help"
    # One line each, with its description.
    for name, command in main.commands.items():
        first_words = command.get_short_help_str(limit=200).split()[:3]
        line = next(line for line in lines if line.split()[:1] == [name])
        assert " ".join(first_words) in line


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"stp, version {__version__}"


def test_convert_help_documents_the_options(cli):
    text = cli("convert", "--help").stdout
    for option in ("--patch", "--stride", "--fps", "--resize", "--short-side", "--pad", "--encoding", "--quality",
                   "--compression", "--shard-size", "--workers", "--overwrite", "--labels", "--max-pixels",
                   "--strict", "--quiet"):
        assert option in text


@pytest.mark.parametrize("args, message", [
    (("--patch", "8x64"), "Expected three integers written TxHxW"),
    (("--stride", "0x0"), "Invalid value for '--stride'"),
    (("--resize", "64"), "Expected two integers written HxW"),
    (("--pad", "mirror"), "'mirror' is not one of 'drop', 'edge', 'zero'"),
    (("--resize", "40x40", "--short-side", "40", "--patch", "4x32x32"), "`resize` and `short_side` are exclusive"),
    (("--patch", "4x64x64", "--resize", "32x32"), "Expected a frame at least as large as the patch (64x64)"),
    (("--fps", "0"), "Invalid value for '--fps'"),
    (("--workers", "0"), "Invalid value for '--workers'"),
])
def test_bad_options_are_usage_errors(cli, tmp_path, clip64, args, message):
    result = cli("convert", clip64.path.rsplit("/", 1)[0], tmp_path / "out", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_inspect(converted, cli):
    root, m = converted
    result = cli("inspect", root)
    assert result.exit_code == 0
    out = result.stdout
    assert f"{root}: 288 patches of uint8 [4, 32, 32, 3] from 12/12 videos (0 failed, 0 skipped)" in out
    assert "spec: patch 4x32x32, stride 4x32x32, pad drop" in out
    size = m["splits"]["train"]["shards"][0]["bytes"]
    assert f"storage: raw, compression none, {size / 1e6:,.1f} MB, {size / 288 / 1e3:,.1f} kB/patch" in out
    assert f"labels: {', '.join(CLASSES)}" in out
    assert "split train: 288 patches, 12 videos, 1 shard(s)" in out
    for name in CLASSES:  # the histogram: one line per class with its count
        assert any(line.split()[:2] == [name, str(PER_CLASS * 24)] for line in out.splitlines())
    assert "problems" not in out


def test_inspect_json_is_the_manifest(converted, cli):
    root, m = converted
    assert json.loads(cli("inspect", root, "--json").stdout) == mf.read_manifest(str(root))


def test_inspect_lists_failures(tmp_path, clip64, cli):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip64.path, src / "good.mp4")
    (src / "broken.mp4").write_text("no video here")
    assert cli("convert", src, tmp_path / "out", "--patch", "4x32x32", "--quiet").exit_code == 1
    out = cli("inspect", tmp_path / "out").stdout
    assert "24 patches of uint8 [4, 32, 32, 3] from 1/2 videos (1 failed, 0 skipped)" in out
    assert "labels: (unlabelled)" in out
    assert "problems (1):" in out
    assert f"failed: {src / 'broken.mp4'}: FFmpeg could not open it" in out


def test_inspect_refuses_a_folder_without_manifest(tmp_path, cli):
    result = cli("inspect", tmp_path)
    assert result.exit_code == 3 and "no manifest" in result.stderr  # bad data (README: exit codes)


def test_preview_png_shows_the_sampled_patches(converted, cli, tmp_path):
    root, m = converted
    png = tmp_path / "grid.png"
    result = cli("preview", root, "--out", png, "--count", "3", "--scale", "2")
    assert result.exit_code == 0
    assert f"wrote {png}: 3 patches" in result.stdout
    image = np.asarray(Image.open(png).convert("RGB"))
    # Rows: 3 patches of 32 rows x 2, 4 pixels apart. Columns: 4 frames of 32 x 2, 2 pixels apart.
    assert image.shape == (3 * 64 + 2 * 4, 4 * 64 + 3 * 2, 3)
    # The rows are records 0, 144 and 287 (spread evenly over the 288); each strip is its frames, scaled.
    records = [schema.parse_patch_numpy(r) for i, r in enumerate(_records(root, m)) if i in (0, 144, 287)]
    for row, record in enumerate(records):
        for t in range(4):
            strip = image[row * 68:row * 68 + 64, t * 66:t * 66 + 64]
            np.testing.assert_array_equal(strip, record[schema.PATCH][t].repeat(2, axis=0).repeat(2, axis=1))
        if row < 2:
            assert (image[row * 68 + 64:row * 68 + 68] == 255).all()  # white gap between rows
    assert (image[:, 64:66] == 255).all()  # white gap between frames
    lines = result.stdout.splitlines()[1:]
    assert lines[0].strip() == "circle/circle_0.mp4 t=0 y=0 x=0 (0.00s) label=circle"
    assert lines[2].strip().startswith("stripe/stripe_3.mp4 t=20 y=32 x=32")


def _records(root, m):
    import tensorflow as tf

    return [r.numpy() for p in mf.shard_files(str(root), m, "train") for r in tf.data.TFRecordDataset(p)]


def test_preview_of_an_unknown_split(converted, cli, tmp_path):
    result = cli("preview", converted[0], "--out", tmp_path / "x.png", "--split", "test")
    assert result.exit_code == 2 and "split 'test' holds no patches" in result.stderr  # bad usage
    assert not (tmp_path / "x.png").exists()


def test_no_progress_bar_when_not_a_terminal(tmp_path, clip64, cli):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip64.path, src / "v.mp4")
    result = cli("convert", src, tmp_path / "out", "--patch", "4x32x32")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.strip() == f"converted 1/1 videos -> {tmp_path / 'out'}: train 24 patches in 1 shard(s)"
    quiet = cli("convert", src, tmp_path / "out2", "--patch", "4x32x32", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_inspect_starts_without_tensorflow(converted):
    """`stp inspect` reads only the manifest: a fresh process prints it and never imports TensorFlow or Keras."""
    import subprocess
    import sys

    code = ("import sys\nfrom stpkeras.cli import main\n"
            "try:\n    main([\"inspect\", sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "loaded = {'tensorflow', 'keras'} & set(sys.modules)\nassert not loaded, sorted(loaded)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(converted[0])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "288 patches of uint8 [4, 32, 32, 3]" in proc.stdout
    assert "cuda" not in proc.stderr.lower()  # TensorFlow's start-up lines


# --- records that fail to read: one line naming the shard and `stp verify`, exit 3 ---------------

def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[record_starts(path)[100] + 16 + 500] ^= 0x01  # in the pixels of record 100: its CRC fails
    path.write_bytes(bytes(data))


def _truncate_at_a_record(path):
    with open(path, "r+b") as f:
        f.truncate(record_starts(path)[200])  # 200 whole records: TF reads them, the count is short


def _truncate_inside_a_record(path):
    with open(path, "r+b") as f:
        f.truncate(record_starts(path)[200] + 30)


@pytest.fixture(scope="module")
def trained_run(converted, tmp_path_factory):
    from click.testing import CliRunner

    from stpkeras.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    result = CliRunner().invoke(main, ["train", str(converted[0]), "--out", str(out), "--epochs", "1",
                                       "--val-split", "none", "--model-arg", "filters=4", "--verbose", "0",
                                       "--batch-size", "32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate_at_a_record, _truncate_inside_a_record])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_damaged_shard_is_one_line_naming_it_and_stp_verify(command, damage, converted_copy, trained_run, cli,
                                                              tmp_path):
    damage(converted_copy / SHARD)
    if command == "train":
        result = cli("train", converted_copy, "--out", tmp_path / "run", "--epochs", "1", "--val-split", "none",
                     "--model-arg", "filters=4", "--verbose", "0", "--batch-size", "32")
    else:
        result = cli("evaluate", trained_run, converted_copy, "--split", "train", "--out", tmp_path / "eval")
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith(f"Error: {converted_copy / SHARD}: ")
    assert f"Run `stp verify {converted_copy}`" in errors[0]


def test_convert_warns_about_labels_differing_only_by_case(tmp_path, clip64, cli):
    for name in ("Left", "left"):
        (tmp_path / "src" / name).mkdir(parents=True)
        shutil.copy(clip64.path, tmp_path / "src" / name / "v.mp4")
    result = cli("convert", tmp_path / "src", tmp_path / "out", "--patch", "4x32x32")
    assert result.exit_code == 0
    warning = ("warning: labels 'Left' and 'left' differ only by case: they are 2 classes "
               "(pass --labels to fix the set)")
    assert warning in result.stderr.splitlines()
    assert mf.read_manifest(str(tmp_path / "out"))["labels"] == ["Left", "left"]
    assert warning in cli("inspect", tmp_path / "out").stdout


def test_train_flip_labels_is_recorded_and_a_bad_pair_names_the_classes(converted, classes_src, cli, tmp_path):
    import json

    common = ("--epochs", "1", "--val-split", "none", "--model-arg", "filters=4", "--verbose", "0")
    result = cli("train", converted[0], "--out", tmp_path / "run", "--flip-labels", "h:circle=square",
                 "--flip-labels", "v:square=stripe", *common)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["task_options"]["flip_labels"] == ["h:circle=square", "v:square=stripe"]
    # --tta averages over those flips (4 passes) in evaluate and predict; an answer for every clip.
    result = cli("evaluate", tmp_path / "run", converted[0], "--split", "train", "--json", "--tta",
                 "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["video"]["count"] == converted[1]["counts"]["videos"] and evaluated["tta"] is True
    assert json.loads((tmp_path / "eval" / "eval-train.json").read_text())["tta"] is True   # the file says so too
    video = sorted(classes_src.rglob("*.mp4"))[0]
    result = cli("predict", tmp_path / "run", video, "--json", "--tta")
    assert result.exit_code == 0 and json.loads(result.stdout)["label"] in ("circle", "square", "stripe"), result.output
    result = cli("predict", tmp_path / "run", video, "--tta", "--server", "http://127.0.0.1:1/v1/models/m")
    assert result.exit_code == 2 and "pass one of --tta and --server" in result.output
    result = cli("train", converted[0], "--out", tmp_path / "plain", *common)
    result = cli("evaluate", tmp_path / "plain", converted[0], "--split", "train", "--tta", "--out", tmp_path / "e2")
    assert result.exit_code == 2 and "with such flips. Received a keras model of task 'classify' with " \
                                     "flip_labels=[]" in result.output and "Traceback" not in result.output
    # --tta-flip-labels: flips at test time only, besides the run's own (the run's h:circle=square again is no
    # second pass); the plain run takes them too. The logits are those of the 8 (4) flips' mean, each put back.
    from stpkeras import artifacts, augment
    from stpkeras.pipeline import load_info

    result = cli("evaluate", tmp_path / "run", converted[0], "--split", "train", "--json", "--out", tmp_path / "e3",
                 "--tta-flip-labels", "t:circle=stripe", "--tta-flip-labels", "h:circle=square")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["tta"] is True and evaluated["tta_flip_labels"] == ["t:circle=stripe", "h:circle=square"]
    assert evaluated["tta_flips"] == ["h:circle=square", "v:square=stripe", "t:circle=stripe"]   # all it averaged
    run = artifacts.load(str(tmp_path / "run"))
    averaged = artifacts.flip_averaged(run, ("t:circle=stripe", "h:circle=square"))
    patches = np.random.default_rng(0).integers(0, 256, (3, *load_info(str(converted[0])).spec.shape), dtype=np.uint8)
    by_hand = augment.flip_averaged(run.model, augment.parse_flip_labels(
        ["h:circle=square", "v:square=stripe", "t:circle=stripe"], run.labels))
    np.testing.assert_allclose(averaged.model.predict(patches, verbose=0), by_hand.predict(patches, verbose=0),
                               rtol=1e-5, atol=1e-5)
    result = cli("predict", tmp_path / "plain", video, "--json", "--tta-flip-labels", "h:circle=square")
    assert result.exit_code == 0 and json.loads(result.stdout)["label"] in ("circle", "square", "stripe"), result.output
    result = cli("predict", tmp_path / "plain", video, "--tta-flip-labels", "t:circle=nope")
    assert result.exit_code == 2 and "Received 't:circle=nope'" in result.output and "Traceback" not in result.output
    result = cli("train", converted[0], "--out", tmp_path / "bad", "--flip-labels", "h:circle=left", *common)
    assert result.exit_code != 0 and "Received 'h:circle=left'" in result.output
    assert "['circle', 'square', 'stripe']" in result.output and "Traceback" not in result.output
    result = cli("train", converted[0], "--out", tmp_path / "bad2", "--task", "regress",
                 "--flip-labels", "h:circle=square", *common)
    assert result.exit_code == 2 and "--flip-labels and --tta-flip-labels are options of --task classify" \
        in result.output
    # `stp train --tta-flip-labels`: a symmetry for test time only, recorded, so that --tta alone (and the
    # export's) averages over it too; a bad pair fails before training.
    result = cli("train", converted[0], "--out", tmp_path / "recorded", "--flip-labels", "h:circle=square",
                 "--tta-flip-labels", "t:circle=stripe", *common)
    assert result.exit_code == 0, result.output
    recorded = artifacts.load(str(tmp_path / "recorded"))
    assert recorded.task_options["tta_flip_labels"] == ["t:circle=stripe"]
    averaged = artifacts.flip_averaged(recorded)
    assert averaged.tta == ("h:circle=square", "t:circle=stripe")
    by_hand = augment.flip_averaged(recorded.model, augment.parse_flip_labels(averaged.tta, recorded.labels))
    np.testing.assert_allclose(averaged.model.predict(patches, verbose=0), by_hand.predict(patches, verbose=0),
                               rtol=1e-5, atol=1e-5)
    result = cli("export", tmp_path / "recorded", "--name", "rec", "--out", tmp_path / "sm", "--tta")
    assert result.exit_code == 0 and "test-time flips: h:circle=square, t:circle=stripe (4 passes a patch)" \
        in result.output, result.output
    result = cli("train", converted[0], "--out", tmp_path / "bad3", "--tta-flip-labels", "t:circle=nope", *common)
    assert result.exit_code != 0 and "Received 't:circle=nope'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad3" / "best.keras").exists()
