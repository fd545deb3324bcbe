"""Serving clients (REST and gRPC) against the stand-in server on 127.0.0.1 (a test double, not TF Serving)."""

import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

import stpkeras
from stpkeras import export as ex
from stpkeras import serving
from stpkeras.cli import main
from stpkeras.testing.standin_server import StandInServer
from tfrecords_tools.spec import PatchSpec

SPEC = PatchSpec(frames=8, height=32, width=32)
LABELS = ("down", "left", "right", "up")
FAST = dict(retries=2, backoff_s=0.01)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from stpkeras.models import build_model
    from stpkeras.testing.models import write_run

    root = tmp_path_factory.mktemp("serving")
    run_dir = write_run(str(root / "run"), build_model("stcnn", SPEC, len(LABELS)), SPEC, LABELS)
    result = ex.export_for_serving(run_dir, str(root / "saved_models"), "clf")
    return result


@pytest.fixture(scope="module")
def server(exported):
    with StandInServer(os.path.dirname(exported.path), "clf") as s:
        yield s


@pytest.fixture(scope="module")
def local(exported):
    return stpkeras.load(exported.path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def urls(server):
    return {"rest": server.rest_url, "grpc": server.grpc_url}


def test_parse_server_urls():
    a = serving.ServerAddress.parse("http://host:8501/v1/models/clf")
    assert (a.scheme, a.host, a.port, a.model, a.version) == ("http", "host", 8501, "clf", None)
    a = serving.ServerAddress.parse("grpc://10.0.0.2/clf/versions/3")
    assert (a.scheme, a.port, a.model, a.version) == ("grpc", 8500, "clf", 3)
    assert serving.ServerAddress.parse("https://h/v1/models/m/versions/2").model_url == \
        "https://h:8501/v1/models/m/versions/2"
    for bad in ("http://host:8501/clf", "grpc://host:8500/", "ftp://h/v1/models/m", "clf"):
        with pytest.raises(ValueError, match="Invalid server URL"):
            serving.ServerAddress.parse(bad)


def test_split_batches():
    assert serving.split_batches([3, 3, 3, 3, 3], 7) == [(0, 2), (2, 4), (4, 5)]
    assert serving.split_batches([7, 1], 7) == [(0, 1), (1, 2)]
    assert serving.split_batches([], 7) == []
    with pytest.raises(serving.RequestTooLarge, match="above the limit"):
        serving.split_batches([3, 9], 7)


def test_json_uint8_equals_json_of_the_list():
    rng = np.random.default_rng(0)
    for shape in [(), (1,), (5,), (2, 3), (4, 1, 2, 1, 3), (1, 8, 32, 32, 3), (0, 3)]:
        a = rng.integers(0, 256, size=shape, dtype=np.uint8)
        assert json.loads(serving.json_uint8(a)) == a.tolist(), shape
    assert serving.json_uint8(np.array([[0, 255]], np.uint8)) == b"[[0,255]]"


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_outputs_equal_local_model(server, local, api):
    x = np.random.default_rng(1).integers(0, 256, size=(5, *SPEC.shape), dtype=np.uint8)
    want = local(x)
    with serving.connect(urls(server)[api], **FAST) as client:
        got = client.predict({ex.PATCHES: x})
        assert set(got) == {ex.LOGITS, ex.PROBABILITIES, ex.CLASS_IDS, ex.CLASS_NAMES}
        np.testing.assert_allclose(got[ex.LOGITS], want[ex.LOGITS], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[ex.PROBABILITIES], want[ex.PROBABILITIES], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got[ex.CLASS_IDS], want[ex.CLASS_IDS])
        assert list(got[ex.CLASS_NAMES]) == list(want[ex.CLASS_NAMES])
        assert all(isinstance(v, str) for v in got[ex.CLASS_NAMES])
        # A single-output signature (TF Serving drops the output's name over REST).
        emb = client.predict({ex.PATCHES: x}, ex.EMBEDDINGS)
        np.testing.assert_allclose(emb[ex.EMBEDDINGS], local.embed(x), atol=1e-5, rtol=0)
        # Patch records replayed at the server.
        records = np.array([ex.example_bytes(p) for p in x], dtype=object)
        by_record = client.predict({ex.EXAMPLES: records}, ex.SERVE_EXAMPLES)
        np.testing.assert_allclose(by_record[ex.LOGITS], want[ex.LOGITS], atol=1e-5, rtol=0)
        assert client.metadata()["metadata"]["signature_def"]["signature_def"][ex.SERVING_DEFAULT]["inputs"][
            ex.PATCHES]["dtype"] == "DT_UINT8"


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_large_batches_are_split_under_the_limit(server, local, api):
    x = np.random.default_rng(2).integers(0, 256, size=(9, *SPEC.shape), dtype=np.uint8)
    limit_mb = 0.3 if api == "rest" else 0.08  # one patch is 24 KiB raw, ~90 KiB as JSON
    before = len(server.requests)
    with serving.connect(urls(server)[api], max_request_mb=limit_mb, **FAST) as client:
        got = client.predict({ex.PATCHES: x})
    sent = server.requests[before:]
    assert sum(batch for _, _, batch, _ in sent) == 9 and len(sent) == client.requests
    assert len(sent) >= 3
    assert all(size <= limit_mb * 2**20 for _, _, _, size in sent), sent
    np.testing.assert_allclose(got[ex.LOGITS], local(x)[ex.LOGITS], atol=1e-5, rtol=0)
    with serving.connect(urls(server)[api], max_request_mb=0.01, **FAST) as client:
        with pytest.raises(serving.RequestTooLarge, match="--max-request-mb"):
            client.predict({ex.PATCHES: x})


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_unknown_model_or_version(server, api):
    base = urls(server)[api]
    x = np.zeros((1, *SPEC.shape), np.uint8)
    for url in (base.replace("/clf", "/nope"), base + "/versions/7"):
        with serving.connect(url, **FAST) as client:
            with pytest.raises(serving.ModelNotFound, match="Servable not found"):
                client.predict({ex.PATCHES: x})


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_wrong_shape_or_dtype_is_a_bad_request(server, api):
    with serving.connect(urls(server)[api], **FAST) as client:
        with pytest.raises(serving.BadRequest, match=r"patches: uint8 \[2, 4, 32, 32, 3\].*expects"):
            client.predict({ex.PATCHES: np.zeros((2, 4, 32, 32, 3), np.uint8)})
        with pytest.raises(serving.BadRequest, match="float"):
            client.predict({ex.PATCHES: np.zeros((1, *SPEC.shape), np.float32)})
        with pytest.raises(serving.BadRequest, match="not found in signature def"):
            client.predict({ex.PATCHES: np.zeros((1, *SPEC.shape), np.uint8)}, "no_such_signature")


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_server_down(api):
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1/models/clf" if api == "rest" else f"grpc://127.0.0.1:{port}/clf"
    with serving.connect(url, timeout_s=2, **FAST) as client:
        with pytest.raises(serving.ServerUnavailable, match=r"cannot reach the server.*gave up after 3 tries"):
            client.predict({ex.PATCHES: np.zeros((1, *SPEC.shape), np.uint8)})


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_timeout_is_retried_then_reported(exported, api):
    with StandInServer(os.path.dirname(exported.path), "clf", delay_s=1.0) as slow:
        with serving.connect(urls(slow)[api], timeout_s=0.2, retries=1, backoff_s=0.01) as client:
            with pytest.raises(serving.ServingTimeout, match=r"no answer within 0.2s.*gave up after 2 tries"):
                client.predict({ex.PATCHES: np.zeros((1, *SPEC.shape), np.uint8)})
        # The retry's request may still be read by the server's thread when the client gives up on it (a loaded
        # machine): wait for it to be recorded, well inside the server's 1 s delay.
        deadline = time.monotonic() + 5.0
        while len(slow.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(slow.requests) == 2  # the first try and one retry reached the server


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_retries_reach_a_server_that_comes_up_late(exported, local, api):
    rest_port, grpc_port = free_port(), free_port()
    late = StandInServer(os.path.dirname(exported.path), "clf", rest_port=rest_port, grpc_port=grpc_port)
    url = f"http://127.0.0.1:{rest_port}/v1/models/clf" if api == "rest" else f"grpc://127.0.0.1:{grpc_port}/clf"
    timer = threading.Timer(0.3, late.start)
    timer.start()
    try:
        x = np.random.default_rng(4).integers(0, 256, size=(2, *SPEC.shape), dtype=np.uint8)
        with serving.connect(url, timeout_s=5, retries=6, backoff_s=0.1) as client:
            got = client.predict({ex.PATCHES: x})
        np.testing.assert_allclose(got[ex.LOGITS], local(x)[ex.LOGITS], atol=1e-5, rtol=0)
    finally:
        timer.join()
        late.stop()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from stpkeras.demo import make_videos

    folder = make_videos(str(tmp_path_factory.mktemp("videos")), per_class=1, frames=16, height=32, width=64,
                         classes=("left",))
    return os.path.join(folder, "left", "left_000.mp4")


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_cli_predict_with_server_equals_local(exported, server, video, api):
    model_root = os.path.dirname(exported.path)
    local_run = CliRunner().invoke(main, ["predict", model_root, video, "--json", "--top-k", "4"])
    assert local_run.exit_code == 0, local_run.output
    remote = CliRunner().invoke(main, ["predict", model_root, video, "--json", "--top-k", "4", "--server",
                                       urls(server)[api], "--max-request-mb", "0.2", "--batch-size", "4"])
    assert remote.exit_code == 0, remote.output
    a, b = json.loads(local_run.output), json.loads(remote.output)
    assert a["label"] == b["label"] and a["patches"] == b["patches"] == 4
    assert [label for label, _ in a["top_k"]] == [label for label, _ in b["top_k"]]
    assert np.allclose([s for _, s in a["top_k"]], [s for _, s in b["top_k"]], atol=1e-5)


def test_cli_predict_server_down_exits_4_and_a_wrong_url_2(exported, server, video):
    url = f"grpc://127.0.0.1:{free_port()}/clf"
    r = CliRunner().invoke(main, ["predict", exported.path, video, "--server", url, "--retries", "1",
                                  "--timeout", "2"])
    assert r.exit_code == 4 and "cannot reach the server" in r.output
    wrong = server.rest_url.replace("/clf", "/nope")
    r = CliRunner().invoke(main, ["predict", exported.path, video, "--server", wrong])
    assert r.exit_code == 2 and "Servable not found" in r.output
    r = CliRunner().invoke(main, ["predict", exported.path, video, "--server", "ftp://x/clf"])
    assert r.exit_code == 2 and "Invalid server URL" in r.output


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_multi_label_and_regression_exports_through_the_stand_in(target_runs, tmp_path_factory, api):
    """Probabilities per class, and values with their names, come back over REST and gRPC as the local export
    gives them; `stp predict --server` says what `stp predict` says."""
    from targets import CLASSES, SHAPE, VALUE_NAMES
    from videos import write_video

    _, multi, regress = target_runs
    root = tmp_path_factory.mktemp(f"targets-{api}")
    video = write_video(str(root / "v.mp4"), np.full((8, 32, 32, 3), 100, np.uint8), lossless=True)
    x = np.random.default_rng(5).integers(0, 256, size=(3, *SHAPE), dtype=np.uint8)
    for run_dir, name in ((multi, "multi"), (regress, "regress")):
        result = ex.export_for_serving(run_dir, str(root / "sm"), name)
        local = stpkeras.load(result.path)
        want = local(x)
        with StandInServer(os.path.dirname(result.path), name) as s:
            with serving.connect(urls(s)[api], **FAST) as client:
                got = client.predict({ex.PATCHES: x})
            if name == "multi":
                assert set(got) == {ex.LOGITS, ex.PROBABILITIES} and got[ex.PROBABILITIES].shape == (3, len(CLASSES))
                np.testing.assert_allclose(got[ex.PROBABILITIES], want[ex.PROBABILITIES], atol=1e-5)
            else:
                assert set(got) == {ex.VALUES, ex.VALUE_NAMES}
                np.testing.assert_allclose(got[ex.VALUES], want[ex.VALUES], rtol=1e-5, atol=1e-4)
                assert got[ex.VALUE_NAMES].tolist() == [list(VALUE_NAMES)] * 3
            here = CliRunner().invoke(main, ["predict", result.path, video, "--json"])
            there = CliRunner().invoke(main, ["predict", result.path, video, "--json", "--server", urls(s)[api]])
        assert here.exit_code == 0 and there.exit_code == 0, here.output + there.output
        a, b = json.loads(here.output), json.loads(there.output)
        if name == "multi":
            assert a["labels"] == b["labels"] and dict(a["top_k"]) == pytest.approx(dict(b["top_k"]), abs=1e-5)
        else:
            assert list(a["values"]) == list(VALUE_NAMES)
            assert a["values"] == pytest.approx(b["values"], rel=1e-5)
