"""`stp watch`: a causal export on a file, a pipe, an HTTP stream on 127.0.0.1 and a TF Serving stand-in, each
checked against the whole-clip signature; Ctrl-C and a stalled pipe end cleanly with their exit codes."""

import functools
import http.server
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from stpkeras.cli import main
from videos import pattern_frames, write_video

FRAMES = 12


@pytest.fixture(scope="module")
def live(causal_run, tmp_path_factory):
    """(export path, mp4, mpegts, reference answers): the causal run exported with --streaming, a 64x64 clip
    of 12 frames (a 2x2 grid of 32x32 patches: 4 streams), and per-frame probabilities computed without watch."""
    if shutil.which("ffmpeg") is None:   # the live sources (MPEG-TS file, pipe) are made as users make them
        pytest.skip("ffmpeg not installed (Debian's `apt-get install ffmpeg`): the live-source tests remux with it")
    import tensorflow as tf

    from stpkeras import artifacts
    from stpkeras.watch import frames_of, tiles

    root = tmp_path_factory.mktemp("watch")
    result = CliRunner().invoke(main, ["export", str(causal_run), "--name", "live", "--out", str(root / "sm"),
                                       "--streaming"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    export = str(root / "sm" / "live" / "1")
    mp4 = write_video(str(root / "clip.mp4"), pattern_frames(FRAMES, 64, 64, seed=2), fps=10)
    ts = str(root / "clip.ts")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", mp4, "-c", "copy", "-f", "mpegts", ts], check=True)
    spec = artifacts.load(export).spec
    batch = tiles(np.stack(list(frames_of(mp4, spec))), spec)              # [4, 12, 32, 32, 3]
    assert batch.shape == (4, FRAMES, 32, 32, 3)
    sigs = tf.saved_model.load(export).signatures
    whole = sigs["serving_default"](patches=tf.constant(batch[:, :spec.frames]))["logits"].numpy().mean(0)
    state = sigs["init_state"](streams=tf.zeros([4], tf.int32))
    stream = sigs["stream"](frames=tf.constant(batch), **state)["logits"].numpy().mean(0)   # [12, K]
    labels = artifacts.load(export).labels
    return export, mp4, ts, labels, _softmax(whole), _softmax(stream)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _check(answers, labels, whole, stream):
    """Every frame answered once, in order; each answer's probabilities are the one-call stream's, and at frame
    T-1 the whole-clip signature's over frames 0..T-1 (1e-4)."""
    assert [a["frame"] for a in answers] == list(range(FRAMES))
    for a in answers:
        probs = dict(a["top_k"])
        for label, p in probs.items():
            assert abs(p - stream[a["frame"], labels.index(label)]) < 1e-4, a
        assert a["label"] == labels[int(stream[a["frame"]].argmax())]
        assert a["latency_ms"] >= 0 and a["fps"] > 0
    at = answers[3]   # the spec's T = 4 frames
    assert abs(dict(at["top_k"])[at["label"]] - whole[labels.index(at["label"])]) < 1e-4
    assert at["label"] == labels[int(whole.argmax())]


def _lines(text):
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [r for r in rows if "summary" not in r], [r["summary"] for r in rows if "summary" in r]


def test_watch_a_file_answers_every_frame_like_the_whole_clip_model(live, causal_run):
    export, mp4, _, labels, whole, stream = live
    result = CliRunner().invoke(main, ["watch", export, mp4, "--json", "--top-k", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    answers, summary = _lines(result.output)
    _check(answers, labels, whole, stream)
    assert summary[0]["ended"] == "end" and summary[0]["frames"] == FRAMES and summary[0]["streams"] == 4
    # The causal run folder itself (its Keras layers stepped in this process) answers the same.
    result = CliRunner().invoke(main, ["watch", str(causal_run), mp4, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _check(_lines(result.output)[0], labels, whole, stream)
    # --every thins what is printed, not what the model sees; --realtime paces the file at its 10 fps.
    started = time.monotonic()
    result = CliRunner().invoke(main, ["watch", export, mp4, "--json", "--every", "4", "--realtime"])
    assert result.exit_code == 0, result.output
    answers, summary = _lines(result.output)
    assert [a["frame"] for a in answers] == [3, 7, 11] and summary[0]["frames"] == FRAMES
    assert time.monotonic() - started >= (FRAMES - 1) / 10


def test_watch_an_http_stream_and_through_a_serving_stand_in(live, tmp_path):
    """The mpegts file served by http.server on 127.0.0.1, watched locally and with the compute at the
    TF Serving stand-in (REST), the state carried by the client: the same answers."""
    from stpkeras.serving import connect
    from stpkeras.testing.standin_server import StandInServer
    from stpkeras.watch import WatchConfig, open_streamer, watch

    export, _, ts, labels, whole, stream = live
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.dirname(ts))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{os.path.basename(ts)}"
    try:
        answers = []
        summary = watch(open_streamer(export), WatchConfig(url, timeout_s=20), lambda a: answers.append(a.to_dict()))
        assert summary.ended == "end" and summary.exit_code == 0
        _check(answers, labels, whole, stream)
        with StandInServer(os.path.dirname(export), "live") as server:
            for server_url in (server.rest_url, server.grpc_url):
                remote = open_streamer(export, connect(server_url))
                answers = []
                summary = watch(remote, WatchConfig(url, timeout_s=20), lambda a: answers.append(a.to_dict()))
                assert summary.ended == "end"
                _check(answers, labels, whole, stream)
            assert {r[1] for r in server.requests} == {"init_state", "stream"}
            assert {r[0] for r in server.requests} == {"rest", "grpc"}
    finally:
        httpd.shutdown()


def _stp(*args, **kwargs):
    code = "from stpkeras.cli import run; run()"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_watch_a_pipe_from_ffmpeg(live):
    export, mp4, _, labels, whole, stream = live
    ffmpeg = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-i", mp4, "-c", "copy", "-f", "mpegts", "-"],
                              stdout=subprocess.PIPE)
    proc = _stp("watch", export, "-", "--json", stdin=ffmpeg.stdout)
    ffmpeg.stdout.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    answers, summary = _lines(out)
    _check(answers, labels, whole, stream)
    assert summary[0]["ended"] == "end" and summary[0]["source"] == "-"


@pytest.fixture(scope="module")
def long_ts(tmp_path_factory):
    """80 frames of 64x64 as mpegts (about 50 KB: more than the 32 KB a live source is probed with)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed (Debian's `apt-get install ffmpeg`): the live-source tests remux with it")
    root = tmp_path_factory.mktemp("long")
    mp4 = write_video(str(root / "long.mp4"), pattern_frames(80, 64, 64, seed=3), fps=10)
    ts = str(root / "long.ts")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", mp4, "-c", "copy", "-f", "mpegts", ts], check=True)
    return ts


def _stalled(export, ts, *args):
    """`stp watch EXPORT - --json ARGS` fed the first 70% of an mpegts file through a pipe left open: answers
    come, then the source goes silent. Returns (process, the pipe's write end, the first line)."""
    read, write = os.pipe()
    proc = _stp("watch", export, "-", "--json", *args, stdin=read)
    os.close(read)
    data = open(ts, "rb").read()
    os.write(write, data[:len(data) * 7 // 10])
    first = proc.stdout.readline()   # an answer: the process is in its loop
    return proc, write, first


def test_ctrl_c_ends_with_a_summary_and_130(live, long_ts):
    export, *_ = live
    proc, write, first = _stalled(export, long_ts, "--timeout", "60")
    try:
        assert json.loads(first)["frame"] == 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(write)
    assert proc.returncode == 130, err[-2000:]
    _, summary = _lines(out)
    assert summary[0]["ended"] == "interrupted" and summary[0]["frames"] >= 1
    assert "Traceback" not in err


def test_a_silent_source_ends_after_timeout_with_4(live, long_ts):
    export, *_ = live
    proc, write, first = _stalled(export, long_ts, "--timeout", "2")
    try:
        assert json.loads(first)["frame"] == 0
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(write)
    assert proc.returncode == 4, err[-2000:]
    _, summary = _lines(out)
    assert summary[0]["ended"] == "silent" and "no frame for 2s" in summary[0]["message"]
    assert "Traceback" not in err


def test_a_missing_source_or_a_model_that_cannot_stream_is_one_line(live, causal_run, tmp_path):
    export, mp4, *_ = live
    result = CliRunner().invoke(main, ["watch", export, "/no/such/video.mp4"])
    assert result.exit_code == 2 and "/no/such/video.mp4: no such file or device" in result.output
    plain = CliRunner().invoke(main, ["export", str(causal_run), "--name", "plain", "--out", str(tmp_path)])
    assert plain.exit_code == 0, plain.output
    result = CliRunner().invoke(main, ["watch", str(tmp_path / "plain"), mp4])
    assert result.exit_code == 2 and "no stream or init_state signature" in result.output
    assert "--streaming" in result.output and "Traceback" not in result.output


def test_the_wait_for_a_frame_ends_on_a_frame_a_timeout_or_a_ctrl_c():
    """`_next_frame` waits in short slices: a frame, a silent source (None), or a Ctrl-C seen while waiting
    for ever (`--timeout` unset); SIGINT only sets the flag while `watch` runs, and the old handler returns."""
    from stpkeras.watch import _next_frame, _sigint_sets

    frames, flag = queue.Queue(), threading.Event()
    frames.put("frame")
    assert _next_frame(frames, 5.0, flag) == "frame"
    assert _next_frame(frames, 0.2, flag) is None
    threading.Timer(0.3, flag.set).start()
    with pytest.raises(KeyboardInterrupt):
        _next_frame(frames, None, flag)
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")
    before, flag = signal.getsignal(signal.SIGINT), threading.Event()
    with _sigint_sets(flag):
        signal.raise_signal(signal.SIGINT)
        assert flag.wait(5)
    assert signal.getsignal(signal.SIGINT) is before
