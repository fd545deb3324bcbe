"""Export: layout, assets, warmup, and the SavedModel loaded the way TF Serving loads it, in fresh processes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from stpkeras import artifacts
from stpkeras import export as ex
from stpkeras.cli import main
from tfrecords_tools import manifest as manifest_lib
from tfrecords_tools import schema
from tfrecords_tools.outputs import LOCK_NAME
from tfrecords_tools.spec import PatchSpec

SPEC = PatchSpec(frames=8, height=32, width=32, stride_frames=4)
LABELS = ("down", "left", "right", "up")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The real chain on real videos: make -> convert -> train (tiny) -> export the run folder."""
    from stpkeras.demo import make_videos
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("export")
    videos = make_videos(str(root / "videos"), per_class=2, frames=16, height=32, width=32)
    convert(ConvertConfig(src=videos, out=str(root / "data"), spec=SPEC, split_fractions=(("val", 0.25),),
                          workers=1, command="test"))
    run_dir = str(root / "run")
    run = train(TrainConfig.tiny(str(root / "data"), run_dir, epochs=1), echo=lambda *a: None)
    assert tuple(run["labels"]) == LABELS
    model = artifacts.load_keras_model(os.path.join(run_dir, "best.keras"))
    result = ex.export_for_serving(run_dir, str(root / "saved_models"), "clf")
    return model, run_dir, result


def keras_reference(model, x):
    import keras

    logits = np.asarray(model(x, training=False))
    features = keras.Model(model.input, model.get_layer("features").output)
    return logits, np.asarray(features(x, training=False))


def test_layout_assets_and_versions(exported):
    model, run_dir, result = exported
    assert result.version == 1 and result.path.endswith(os.path.join("clf", "1"))
    assert result.signatures == (ex.SERVING_DEFAULT, ex.SERVE_EXAMPLES, ex.EMBEDDINGS)
    with open(os.path.join(result.path, "assets", ex.LABELS_ASSET)) as f:
        assert f.read() == "down\nleft\nright\nup\n"
    assert artifacts.read_assets(result.path) == (LABELS, SPEC)
    with open(os.path.join(result.path, ex.INFO_FILE)) as f:
        info = json.load(f)
    assert info["signatures"] == list(result.signatures) and info["run"]["model"] == "stcnn"
    # No temporary folder is left behind; the next export takes the next version.
    root = os.path.dirname(result.path)
    assert sorted(os.listdir(root)) == [LOCK_NAME, "1"]
    second = ex.export_for_serving(run_dir, os.path.dirname(root), "clf")
    assert second.version == 2 and artifacts.resolve_saved_model(root) == second.path
    with pytest.raises(ex.ExportError, match="version 2 exists"):
        ex.export_for_serving(run_dir, os.path.dirname(root), "clf", version=2)
    with pytest.raises(ex.ExportError, match="Invalid model name"):
        ex.export_for_serving(run_dir, os.path.dirname(root), "bad/name")
    shutil.rmtree(second.path)


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf

    # (export, inputs, outputs) triples: one process serves several exports (each fresh process imports TF).
    for path, inputs, out in zip(*[iter(sys.argv[1:])] * 3):
        data = dict(np.load(inputs, allow_pickle=True))
        results = {}
        # 1. The TF1 session loader with tag "serve": the C++ SavedModel loader TF Serving uses.
        with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
            for name, signature in meta.signature_def.items():
                if name.startswith("__"):
                    continue
                for key, value in data.items():
                    if not key.startswith(name + "/"):
                        continue
                    (input_key, info), = signature.inputs.items()
                    fetched = sess.run({k: v.name for k, v in signature.outputs.items()}, {info.name: value})
                    for k, v in fetched.items():
                        results[f"v1/{key}/{k}"] = v
        # 2. The TF2 loader.
        loaded = tf.saved_model.load(path)
        for key, value in data.items():
            name = key.split("/")[0]
            fn = loaded.signatures[name]
            (input_key, _), = fn.structured_input_signature[1].items()
            for k, v in fn(**{input_key: tf.constant(value)}).items():
                results[f"v2/{key}/{k}"] = v.numpy()
        np.savez(out, **results)
""")


def test_fresh_process_loaders_equal_keras(exported, tmp_path):
    """Both loaders, every signature, batch sizes 1 and 5, in a new process: outputs equal Keras within 1e-5."""
    model, _, result = exported
    rng = np.random.default_rng(7)
    inputs = {}
    for batch in (1, 5):
        x = rng.integers(0, 256, size=(batch, *SPEC.shape), dtype=np.uint8)
        inputs[f"{ex.SERVING_DEFAULT}/{batch}"] = x
        inputs[f"{ex.EMBEDDINGS}/{batch}"] = x
        # Lossless encodings, so the records decode to exactly these pixels.
        inputs[f"{ex.SERVE_EXAMPLES}/{batch}"] = np.array(
            [ex.example_bytes(p, "raw" if i % 2 == 0 else "png") for i, p in enumerate(x)], dtype=object)
    np.savez(tmp_path / "in.npz", **inputs)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(script), result.path, str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(np.load(tmp_path / "out.npz", allow_pickle=True))
    for loader in ("v1", "v2"):
        for batch in (1, 5):
            x = inputs[f"{ex.SERVING_DEFAULT}/{batch}"]
            logits, features = keras_reference(model, x)
            for sig in (ex.SERVING_DEFAULT, ex.SERVE_EXAMPLES):
                key = f"{loader}/{sig}/{batch}"
                np.testing.assert_allclose(out[f"{key}/{ex.LOGITS}"], logits, atol=1e-5, rtol=0)
                e = np.exp(logits - logits.max(-1, keepdims=True))
                np.testing.assert_allclose(out[f"{key}/{ex.PROBABILITIES}"], e / e.sum(-1, keepdims=True), atol=1e-5)
                np.testing.assert_array_equal(out[f"{key}/{ex.CLASS_IDS}"], logits.argmax(-1))
                assert [v.decode() for v in out[f"{key}/{ex.CLASS_NAMES}"]] == [LABELS[i] for i in logits.argmax(-1)]
                assert out[f"{key}/{ex.LOGITS}"].shape == (batch, len(LABELS))
            np.testing.assert_allclose(out[f"{loader}/{ex.EMBEDDINGS}/{batch}/{ex.EMBEDDINGS}"], features,
                                       atol=1e-5, rtol=0)


def test_saved_model_cli_lists_signatures(exported):
    _, _, result = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run([cli, "show", "--all", "--dir", result.path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for name in (ex.SERVING_DEFAULT, ex.SERVE_EXAMPLES, ex.EMBEDDINGS):
        assert f"signature_def['{name}']" in text
    assert "inputs['patches'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 8, 32, 32, 3)" in text
    assert "inputs['examples'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in text
    for output in (ex.LOGITS, ex.PROBABILITIES, ex.CLASS_IDS, ex.CLASS_NAMES, ex.EMBEDDINGS):
        assert f"outputs['{output}']" in text


def test_warmup_records_replay(exported):
    """Every warmup record is a PredictionLog whose request runs on the export, as TF Serving replays it."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    _, _, result = exported
    loaded = tf.saved_model.load(result.path)
    records = list(tf.data.TFRecordDataset(os.path.join(result.path, ex.WARMUP_FILE)).as_numpy_iterator())
    assert len(records) == result.warmup_records == 3 * len(ex.WARMUP_BATCH_SIZES)
    seen = set()
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record)
        request = log.predict_log.request
        assert request.model_spec.name == "clf"
        sig = request.model_spec.signature_name
        (key, proto), = request.inputs.items()
        value = tf.make_ndarray(proto)
        outputs = loaded.signatures[sig](**{key: tf.constant(value)})
        assert next(iter(outputs.values())).shape[0] == len(value)
        seen.add((sig, len(value)))
    assert seen == {(s, b) for s in result.signatures for b in ex.WARMUP_BATCH_SIZES}


def test_wrong_dtype_or_shape_is_a_clear_error(exported):
    import tensorflow as tf

    import stpkeras

    _, _, result = exported
    predictor = stpkeras.load(result.path)
    with pytest.raises(ValueError, match=r"expected uint8 patches \[batch, 8, 32, 32, 3\].*Received float32"):
        predictor(np.zeros((2, *SPEC.shape), np.float32))
    with pytest.raises(ValueError, match=r"Received uint8 \[2, 4, 32, 32, 3\]"):
        predictor(np.zeros((2, 4, 32, 32, 3), np.uint8))
    # The raw signature refuses them too: its input signature is fixed.
    fn = tf.saved_model.load(result.path).signatures[ex.SERVING_DEFAULT]
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        fn(patches=tf.zeros((2, *SPEC.shape), tf.float32))
    # A record whose patch shape differs from the spec names the problem.
    other = np.zeros((8, 16, 16, 3), np.uint8)
    examples = tf.saved_model.load(result.path).signatures[ex.SERVE_EXAMPLES]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="patch/shape differs from the PatchSpec shape of this export"):
        examples(examples=tf.constant([ex.example_bytes(other)]))


def test_corrupted_saved_model_is_a_clear_error(exported, tmp_path):
    import stpkeras

    _, _, result = exported
    broken = tmp_path / "broken" / "1"
    shutil.copytree(result.path, broken)
    with open(broken / "saved_model.pb", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ex.ExportError, match=r"broken.1: not a loadable SavedModel"):
        stpkeras.load(str(broken.parent))
    no_vars = tmp_path / "novars"
    shutil.copytree(result.path, no_vars)
    shutil.rmtree(no_vars / "variables")
    with pytest.raises(ex.ExportError, match="not a loadable SavedModel"):
        stpkeras.load(str(no_vars))
    r = CliRunner().invoke(main, ["predict", str(broken), __file__])
    assert r.exit_code == 2 and "not a loadable SavedModel" in r.output


def test_export_cli_and_keras_file_sources(exported, tmp_path):
    model, run_dir, _ = exported
    out = tmp_path / "sm"
    r = CliRunner().invoke(main, ["export", run_dir, "--name", "cli", "--out", str(out), "--version", "3"])
    assert r.exit_code == 0, r.output
    assert f"-> {out / 'cli' / '3'}" in r.output
    assert "signatures: serving_default, serve_examples, embeddings" in r.output
    # A .keras file away from its run folder needs labels and spec: --data gives both.
    lone = tmp_path / "lone.keras"
    shutil.copy(os.path.join(run_dir, "best.keras"), lone)
    r = CliRunner().invoke(main, ["export", str(lone), "--name", "lone", "--out", str(out)])
    assert r.exit_code == 2 and "labels and PatchSpec are unknown" in r.output and "--data" in r.output
    data = tmp_path / "data"
    data.mkdir()
    manifest_lib.write_manifest(str(data), {
        "format": manifest_lib.FORMAT, "schema_version": schema.SCHEMA_VERSION, "spec": SPEC.to_dict(),
        "encoding": "raw", "compression": "none", "labels": list(LABELS), "splits": {}})
    r = CliRunner().invoke(main, ["export", str(lone), "--name", "lone", "--out", str(out), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert artifacts.read_assets(str(out / "lone" / "1")) == (LABELS, SPEC)
    # Labels that do not match the model's outputs are refused before anything is written.
    r = CliRunner().invoke(main, ["export", run_dir, "--name", "x", "--out", str(out), "--labels", "a,b,c"])
    assert r.exit_code == 2 and "outputs 4 logits but there are 3 labels" in r.output
    assert not (out / "x").exists() or ex.versions(str(out / "x")) == []


def test_a_tta_export_serves_the_flip_averaged_answer_in_a_fresh_process(exported, tmp_path):
    """`stp export --tta-flip-labels ...` bakes `stp predict --tta`'s flips into the served signatures: in a new
    process, both loaders answer the in-process flip average (not the plain model), exactly symmetric under each
    flip (a mirrored clip gets the mirrored class); `embeddings` stays the one-pass features."""
    import tensorflow as tf

    from stpkeras import augment

    model, run_dir, _ = exported
    flips = ["h:left=right", "v:up=down", "t:left=right", "t:up=down"]
    out = tmp_path / "sm"
    r = CliRunner().invoke(main, ["export", run_dir, "--name", "tta", "--out", str(out),
                                  *[a for f in flips for a in ("--tta-flip-labels", f)]])
    assert r.exit_code == 0, r.output
    assert f"test-time flips: {', '.join(flips)} (8 passes a patch)" in r.output
    path = str(out / "tta" / "1")
    with open(os.path.join(path, ex.INFO_FILE)) as f:
        assert json.load(f)["tta"] == {"flips": flips, "passes": 8}
    assert artifacts.load(path).tta == tuple(flips) and artifacts.load(exported[2].path).tta == ()
    x = np.random.default_rng(11).integers(0, 256, size=(3, *SPEC.shape), dtype=np.uint8)
    views = {axis: np.asarray(augment.flip_clips(tf.constant(x), axis)) for axis in ("h", "t")}
    batch = np.concatenate([x, views["h"], views["t"]])
    np.savez(tmp_path / "in.npz", **{f"{ex.SERVING_DEFAULT}/9": batch, f"{ex.EMBEDDINGS}/3": x})
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(script), path, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "out.npz", allow_pickle=True))
    averaged = artifacts.flip_averaged(artifacts.load(run_dir), flips).model
    reference = np.asarray(averaged(batch, training=False))
    plain, features = keras_reference(model, x)
    for loader in ("v1", "v2"):
        logits = got[f"{loader}/{ex.SERVING_DEFAULT}/9/{ex.LOGITS}"]
        np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=0)
        assert np.abs(logits[:3] - plain).max() > 1e-3          # 8 passes, not the plain model's one
        # LABELS = down, left, right, up: mirrored left-right, left and right swap; played backwards, both pairs.
        np.testing.assert_allclose(logits[3:6], logits[:3][:, [0, 2, 1, 3]], atol=1e-5)
        np.testing.assert_allclose(logits[6:], logits[:3][:, [3, 2, 1, 0]], atol=1e-5)
        np.testing.assert_allclose(got[f"{loader}/{ex.EMBEDDINGS}/3/{ex.EMBEDDINGS}"], features, atol=1e-5)
    # `stp evaluate` measures an export through its serving signature: the flipped export scores what the run
    # scores with the same flips in this process, the plain export what the run scores plainly. It writes only
    # where --out says, never into the export's folder.
    from stpkeras.evaluate import EvalConfig, EvaluateError, evaluate

    data = os.path.join(os.path.dirname(run_dir), "data")
    scores = {}
    for name, model_path, flags in (("export-tta", path, {}), ("run-tta", run_dir, {"tta_flip_labels": tuple(flips)}),
                                    ("export", exported[2].path, {}),
                                    ("run", run_dir, {})):
        scores[name] = evaluate(EvalConfig(model=model_path, data=data, split="val", out=str(tmp_path / name),
                                           **flags))
    assert scores["export-tta"]["tta"] is True and scores["export-tta"]["tta_flips"] == flips
    assert scores["export"]["tta"] is False and scores["export"]["tta_flips"] == []
    for served, here in (("export-tta", "run-tta"), ("export", "run")):
        for level in ("patch", "video"):
            assert scores[served][level]["confusion"] == scores[here][level]["confusion"]
            assert scores[served][level]["accuracy"] == pytest.approx(scores[here][level]["accuracy"])
    before = sorted(os.listdir(path))
    with pytest.raises(EvaluateError, match="an export; pass --out"):
        evaluate(EvalConfig(model=path, data=data, split="val"))
    assert sorted(os.listdir(path)) == before
    # The flips cannot be baked into the stream signature (one pass per frame); nothing is written.
    with pytest.raises(ex.ExportError, match="--tta and --streaming"):
        ex.export_for_serving(run_dir, str(out), "tta-stream", streaming=True, tta=True)
    assert not (out / "tta-stream").exists()


def test_serving_config_lists_every_model(exported, tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    _, _, result = exported
    root = tmp_path / "models"
    for name in ("alpha", "beta"):
        shutil.copytree(result.path, root / name / "1")
    (root / "empty").mkdir()           # no version: not a model
    (root / "beta" / ".export-2-tmp").mkdir()  # a half-written export: ignored
    r = CliRunner().invoke(main, ["serving-config", str(root), "--base-path", "/models"])
    assert r.exit_code == 0, r.output
    config = text_format.Parse(r.output, model_server_config_pb2.ModelServerConfig())
    entries = [(c.name, c.base_path, c.model_platform) for c in config.model_config_list.config]
    assert entries == [("alpha", "/models/alpha", "tensorflow"), ("beta", "/models/beta", "tensorflow")]
    text = ex.serving_config(str(root))
    assert f'base_path: "{os.path.abspath(root)}/alpha"' in text
    r = CliRunner().invoke(main, ["serving-config", str(root / "empty")])
    assert r.exit_code == 2 and "no models found" in r.output


def test_export_to_a_url_uploads_the_version_with_saved_model_pb_last(exported, monkeypatch):
    """An export to a URL (here TF's in-process ram:// file system; gs:// and s3:// take the same gfile
    path, s3:// is tested against moto in tests/test_s3.py) is built locally and uploaded file by file,
    saved_model.pb last; it then loads from there and answers as the local export does."""
    import tensorflow as tf

    model, run_dir, local = exported
    copied = []
    real_copy = tf.io.gfile.copy
    monkeypatch.setattr(tf.io.gfile, "copy",
                        lambda a, b, overwrite=False: copied.append(b) or real_copy(a, b, overwrite))
    result = ex.export_for_serving(run_dir, "ram://exports", "clf")
    assert result.path == "ram://exports/clf/1" and ex.versions("ram://exports/clf") == [1]
    assert copied[-1] == "ram://exports/clf/1/saved_model.pb" and len(copied) > 3
    x = np.random.default_rng(0).integers(0, 256, (2, *SPEC.shape), dtype=np.uint8)
    remote = tf.saved_model.load(result.path).signatures["serving_default"](patches=tf.constant(x))
    here = tf.saved_model.load(local.path).signatures["serving_default"](patches=tf.constant(x))
    np.testing.assert_allclose(remote["probabilities"].numpy(), here["probabilities"].numpy(), atol=1e-6)
    assert ex.export_for_serving(run_dir, "ram://exports", "clf").version == 2


def test_multi_label_and_regression_exports_load_in_a_fresh_process(target_runs, tmp_path):
    """A multi-label export answers sigmoid probabilities per class, a regression export its values in the
    data's units with their names; both loaders in a new process agree with the Keras models within 1e-5."""
    from targets import CLASSES, SHAPE, VALUE_NAMES

    _, multi, regress = target_runs
    x = np.random.default_rng(3).integers(0, 256, size=(3, *SHAPE), dtype=np.uint8)
    runs = {"multi": multi, "regress": regress}
    args = []
    for name, run_dir in runs.items():
        result = ex.export_for_serving(run_dir, str(tmp_path / "sm"), name)
        assert result.signatures == (ex.SERVING_DEFAULT, ex.SERVE_EXAMPLES, ex.EMBEDDINGS)
        assert artifacts.read_assets(result.path)[0] == (CLASSES if name == "multi" else VALUE_NAMES)
        loaded = artifacts.load(result.path)
        assert loaded.task == ("classify" if name == "multi" else "regress")
        assert loaded.multi_label == (name == "multi")
        np.savez(tmp_path / f"in-{name}.npz", **{f"{ex.SERVING_DEFAULT}/3": x, f"{ex.SERVE_EXAMPLES}/3": np.array(
            [ex.example_bytes(p) for p in x], dtype=object)})
        args += [result.path, str(tmp_path / f"in-{name}.npz"), str(tmp_path / f"out-{name}.npz")]
    # Both exports in one fresh process.
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, run_dir in runs.items():
        out = dict(np.load(tmp_path / f"out-{name}.npz", allow_pickle=True))
        reference = np.asarray(artifacts.load(run_dir).model(x, training=False), np.float64)
        for loader in ("v1", "v2"):
            for sig in (ex.SERVING_DEFAULT, ex.SERVE_EXAMPLES):
                key = f"{loader}/{sig}/3"
                if name == "multi":
                    assert {k.split("/")[-1] for k in out if k.startswith(key)} == {ex.LOGITS, ex.PROBABILITIES}
                    np.testing.assert_allclose(out[f"{key}/{ex.PROBABILITIES}"], 1 / (1 + np.exp(-reference)),
                                               atol=1e-5)
                else:
                    assert {k.split("/")[-1] for k in out if k.startswith(key)} == {ex.VALUES, ex.VALUE_NAMES}
                    np.testing.assert_allclose(out[f"{key}/{ex.VALUES}"], reference, rtol=1e-5, atol=1e-4)
                    assert [[v.decode() for v in row] for row in out[f"{key}/{ex.VALUE_NAMES}"]] == \
                        [list(VALUE_NAMES)] * 3


STREAM_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    # A fresh process: only the SavedModel, loaded the way TF Serving loads it (its signatures).
    report = {}
    for path in sys.argv[2:]:
        sigs = tf.saved_model.load(path).signatures
        clip = np.load(sys.argv[1])["clip"]                       # uint8 [2, 10, H, W, 3]
        frames = sigs["serving_default"].structured_input_signature[1]["patches"].shape[1]
        whole = sigs["serving_default"](patches=tf.constant(clip[:, :frames]))["logits"].numpy()
        answers = {}
        for chunks in ((1,) * 10, (2,) * 5, (3, 3, 3, 1), (4, 6), (10,)):
            state = sigs["init_state"](streams=tf.constant([0, 0], tf.int32))
            logits, names, start = [], [], 0
            for n in chunks:
                out = sigs["stream"](frames=tf.constant(clip[:, start:start + n]), **state)
                state = {k: v for k, v in out.items() if k.startswith("state_")}
                assert out["logits"].shape[:2] == (2, n) and out["class_names"].shape == (2, n)
                logits.append(out["logits"].numpy())
                names.append(out["class_names"].numpy())
                start += n
            answers[str(chunks)] = (np.concatenate(logits, 1), np.concatenate(names, 1))
        ref = answers[str((1,) * 10)][0]
        report[path] = {
            "state_keys": sorted(state),
            "chunks_vs_frames": max(float(np.abs(a - ref).max()) for a, _ in answers.values()),
            "stream_vs_whole": float(np.abs(ref[:, frames - 1] - whole).max()),
            "later_frames_change": float(np.abs(ref[:, frames:] - ref[:, frames - 1:frames]).max()),
            "names_agree": all((n == answers[str((10,))][1]).all() for _, n in answers.values()),
        }
    print(json.dumps(report))
""")


def test_streaming_export_feeds_frames_or_chunks_to_the_whole_clip_answer(causal_run, converted, tmp_path):
    """`stp export --streaming` of a causal run (stcnn, `stp train --causal`) and of a causal r2plus1d: in a fresh
    process, a 10-frame clip fed frame by frame and in chunks of 2, 3, 4+6 and 10 gives the same answer at every
    frame (1e-4), and at frame T-1 the whole-clip signature's answer over frames 0..T-1."""
    from stpkeras.models import build_model

    out = tmp_path / "saved_models"
    result = CliRunner().invoke(main, ["export", str(causal_run), "--name", "live", "--out", str(out),
                                       "--streaming"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stream, init_state" in result.output
    info = json.loads((out / "live" / "1" / artifacts.INFO_FILE).read_text())
    assert info["streaming"]["window"] == 4 and set(info["streaming"]["state"]) == {
        "state_conv", "state_causal_mean", "state_causal_mean_count"}
    spec = PatchSpec(4, 32, 32)
    r21d = build_model("r2plus1d", spec, 3, depth=10, widths=(4, 8), causal=True)
    r21d.save(tmp_path / "r21d.keras")
    r21d_export = ex.export_for_serving(str(tmp_path / "r21d.keras"), str(out), "r21d", labels=["a", "b", "c"],
                                        spec=spec, streaming=True)
    clip = np.random.default_rng(3).integers(0, 256, (2, 10, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "clip.npz", clip=clip)
    script = tmp_path / "stream.py"
    script.write_text(STREAM_CHECK)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "clip.npz"), str(out / "live" / "1"),
                           r21d_export.path], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, r in report.items():
        assert r["chunks_vs_frames"] < 1e-4 and r["stream_vs_whole"] < 1e-4, (path, r)
        assert r["later_frames_change"] > 1e-3 and r["names_agree"], (path, r)   # it does answer each frame
    assert len(report[r21d_export.path]["state_keys"]) == 7   # 5 temporal convolutions, the mean and its count
    # TF Serving's warmup replays a request of every signature, the stream's from the zero state.
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    loaded = tf.saved_model.load(r21d_export.path)
    seen = set()
    for record in tf.data.TFRecordDataset(os.path.join(r21d_export.path, ex.WARMUP_FILE)).as_numpy_iterator():
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
        seen.add((request.model_spec.signature_name, int(next(iter(outputs.values())).shape[0])))
    assert seen == {(s, b) for s in r21d_export.signatures for b in ex.WARMUP_BATCH_SIZES}


def test_streaming_export_refuses_a_model_that_looks_ahead(exported, tmp_path):
    _, run_dir, _ = exported
    result = CliRunner().invoke(main, ["export", run_dir, "--name", "x", "--out", str(tmp_path), "--streaming"])
    assert result.exit_code == 2
    assert "--streaming needs a causal model" in result.output and "stp train --causal" in result.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
