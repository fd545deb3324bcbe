"""benchmarks/gpu.py runs on a CPU as its own smoke test (`--smoke`): every model measured both ways, the cached
batches held on the replicas' own devices (two logical CPU devices stand in for two GPUs)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_smoke_measures_every_model_streamed_and_cached():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--smoke", "--devices", "2"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (stcnn|r2plus1d|pretrain) \(.*?\) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| ([\d.]+) ",
                      proc.stdout, re.M)
    assert [r[0] for r in rows] == ["stcnn", "r2plus1d", "pretrain"], proc.stdout
    for _, streamed, cached, clips, ratio in rows:
        assert float(streamed) > 0 and float(cached) > 0
        # One round (--smoke): the ratio is that round's streamed / cached; clips/s is steps/s x global batch.
        assert float(ratio) == pytest.approx(float(streamed) / float(cached), abs=0.01)
        assert abs(int(clips) - float(streamed) * 8) <= 1   # 2 replicas x batch 4
    held, replicas = re.search(r"^cached batches held on: (.*) \(the replicas' devices: (.*)\)$", proc.stdout,
                               re.M).groups()
    assert held.split(", ") == replicas.split(", ") and len(replicas.split(", ")) == 2, proc.stdout
    assert all(d.endswith(("CPU:0", "CPU:1")) for d in held.split(", ")), held
