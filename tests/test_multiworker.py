"""Multi-worker training: two `stp train --strategy multiworker` processes on 127.0.0.1 (TF_CONFIG), checked for
identical weights on both workers and for the data split between them (every record once per epoch)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import Counter


from converted import random_items, write_converted

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
TRAIN = 64


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def train_on_workers(data, run, args, workers=2, timeout=240):
    """`stp train DATA --out RUN --strategy multiworker ARGS` on `workers` processes on 127.0.0.1 (TF_CONFIG);
    asserts each exits 0; returns their outputs."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}
    procs = []
    for i in range(workers):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stpkeras.cli", "train", str(data), "--out", str(run), "--strategy", "multiworker",
             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_workers_train_the_same_weights_on_disjoint_halves_of_the_data(tmp_path):
    data = str(tmp_path / "data")
    # One shard: fewer files than workers, so tf.distribute shards by record (every 2nd record per worker).
    write_converted(data, {"train": random_items(TRAIN, (4, 8, 8, 3), seed=0),
                           "val": random_items(32, (4, 8, 8, 3), seed=1)}, ("a", "b", "c"), shards=1)
    run, trace = tmp_path / "run", tmp_path / "trace"
    outs = train_on_workers(data, run, ["--epochs", "2", "--batch-size", "8", "--seed", "0", "--augment", "none",
                                        "--model-arg", "filters=8", "--trace-records", str(trace), "--verbose", "2"])

    digests = [re.search(r"weights sha256 ([0-9a-f]{64})", out).group(1) for out in outs]
    assert digests[0] == digests[1]

    # Each epoch: 4 steps of a global batch of 16 (8 per worker); together the workers saw every
    # training record exactly once, and no record on both.
    seen = {0: {}, 1: {}}
    for i in range(2):
        for line in open(trace / f"worker-{i}.jsonl"):
            step = json.loads(line)
            seen[i].setdefault(step["epoch"], []).extend(tuple(r) for r in step["records"])
    for epoch in (0, 1):
        a, b = Counter(seen[0][epoch]), Counter(seen[1][epoch])
        assert sum(a.values()) == sum(b.values()) == TRAIN // 2
        assert not set(a) & set(b)
        assert set(a) | set(b) == {(f"v{i % 6}.mp4", i, 0, 0) for i in range(TRAIN)}
        assert max((a + b).values()) == 1

    # Only the chief wrote the run folder; each worker's backup was removed at the end.
    info = json.load(open(run / "run.json"))
    assert info["status"] == "done" and info["strategy"]["replicas"] == 2 and info["strategy"]["workers"] == 2
    assert info["weights_sha256"] == digests[0] and info["metrics"]["optimizer_steps"] == 8
    assert len(open(run / "history.csv").read().strip().splitlines()) == 3
    assert (run / "best.keras").exists() and (run / "last.keras").exists()
    assert not any((run / "backup").iterdir()) if (run / "backup").exists() else True


def test_a_time_budget_stops_every_worker_after_the_same_epoch(tmp_path):
    """`--minutes` under the custom loop: the workers average their clocks (a collective at steps 10 and 50
    and at every epoch end), so they take the same decisions. A budget of 6 ms is spent within the first
    epoch (which always runs): both stop after it, with the same weights and a finished run folder."""
    data = str(tmp_path / "data")
    write_converted(data, {"train": random_items(TRAIN, (4, 8, 8, 3), seed=0)}, ("a", "b", "c"), shards=2)
    run = tmp_path / "run"
    outs = train_on_workers(data, run, ["--minutes", "0.0001", "--epochs", "5", "--steps-per-epoch", "12",
                                        "--batch-size", "4", "--seed", "0", "--augment", "none",
                                        "--model-arg", "filters=4", "--verbose", "2"])
    digests = [re.search(r"weights sha256 ([0-9a-f]{64})", out).group(1) for out in outs]
    assert digests[0] == digests[1]
    record = json.load(open(run / "run.json"))
    assert record["status"] == "done" and record["metrics"]["epochs"] == 1
    assert record["metrics"]["optimizer_steps"] == 12 and record["steps_per_epoch"] == 12
    assert record["budget"]["stopped"] == "budget" and record["budget"]["epochs_this_session"] == 1
    assert record["budget"]["expected_steps"] == 12   # the schedule was cut to the one epoch that fit
    assert (run / "last.keras").exists() and not list(run.glob("backup/*"))   # each worker removed its backup
