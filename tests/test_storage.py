"""Remote storage: a remote OUT (TensorFlow's in-memory ram:// file system standing in for gs://) for convert and
training input; an s3:// path without tensorflow-io's plugin fails at once, saying why."""

from __future__ import annotations

import pytest

from tfrecords_tools import manifest as mf
from tfrecords_tools.convert import ConvertConfig, ConvertError, convert
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.storage import StorageError, check_path, is_remote


def test_convert_to_a_remote_out_then_train_from_it(classes_src, tmp_path, converted):
    import tensorflow as tf

    from stpkeras.train import TrainConfig, train

    out = "ram://stp-test/data"
    with pytest.raises(ConvertError, match="pass a local work folder"):
        convert(ConvertConfig(src=str(classes_src), out=out, spec=PatchSpec(4, 32, 32)))
    m = convert(ConvertConfig(src=str(classes_src), out=out, spec=PatchSpec(4, 32, 32), work_dir=str(tmp_path / "w")))
    assert is_remote(out) and m["counts"]["ok"] == 12
    # The same bytes as the local conversion of the same videos; the local work folder is gone.
    local = mf.read_manifest(str(converted[0]))
    def hashes(manifest):
        return [s["sha256"] for s in manifest["splits"]["train"]["shards"]]

    assert hashes(m) == hashes(local)
    assert sorted(tf.io.gfile.listdir(out)) == ["dataset.json", "train-00000-of-00001.tfrecord"]
    assert list((tmp_path / "w").iterdir()) == []
    run = train(TrainConfig.tiny(out, str(tmp_path / "run"), epochs=1, val_split="none"), echo=lambda s: None)
    assert run["status"] == "done" and run["data"] == out


def test_s3_without_the_plugin_fails_at_once_saying_why(tmp_path, cli):
    import tensorflow as tf

    try:
        import tensorflow_io  # noqa: F401
        pytest.skip("tensorflow-io's plugin loads here (tox -e io): s3:// works")
    except Exception:
        pass
    with pytest.raises(StorageError) as e:
        check_path("s3://bucket/data")
    message = str(e.value)
    assert f"TensorFlow {tf.__version__} has no file system for s3://" in message
    assert "tensorflow-io==0.37.1" in message and "tensorflow>=2.16,<2.18" in message
    assert check_path("gs://bucket/data") == "gs://bucket/data" and check_path(str(tmp_path)) == str(tmp_path)
    result = cli("train", "s3://bucket/data", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "no file system for s3://" in result.output
