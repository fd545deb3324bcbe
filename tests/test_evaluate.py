"""Tests of stpkeras.evaluate: metrics on a hand-computed case, video-level averaging, and
`stp evaluate --json` on a real run checked against the model's own outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from converted import random_items, write_converted
from stpkeras.cli import main
from stpkeras.evaluate import EvaluateError, classification_metrics, video_level


def test_metrics_on_a_hand_computed_case():
    # true:      a a a b b c     predicted: a a b b c c
    labels = np.array([0, 0, 0, 1, 1, 2])
    logits = np.array([[3, 1, 0], [2, 0, 1], [0, 2, 1], [0, 3, 1], [0, 1, 2], [1, 0, 4]], float)
    m = classification_metrics(labels, logits, ["a", "b", "c"], top_k=2)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a 2/2, b 1/2, c 1/2; recall a 2/3, b 1/2, c 1/1
    per = m["per_class"]
    assert [per[c]["precision"] for c in "abc"] == pytest.approx([1.0, 0.5, 0.5])
    assert [per[c]["recall"] for c in "abc"] == pytest.approx([2 / 3, 0.5, 1.0])
    f1 = [2 * 2 / 3 / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert [per[c]["f1"] for c in "abc"] == pytest.approx(f1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    # top-2: only row 3 misses (true a scores 0; b and c score 2 and 1).
    assert m["top2"] == pytest.approx(5 / 6)
    assert [per[c]["support"] for c in "abc"] == [3, 2, 1]


def test_a_class_never_predicted_or_absent_counts_zero():
    m = classification_metrics(np.array([0, 0]), np.array([[1.0, 0, 0], [1.0, 0, 0]]), ["a", "b", "c"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["accuracy"] == 1.0 and m["f1"] == pytest.approx(1 / 3) and m["top2"] == 1.0


def test_video_level_averages_the_logits_of_each_video():
    ids = np.array([b"v1", b"v2", b"v1", b"v2", b"v1"])
    labels = np.array([1, 0, 1, 0, 1])
    logits = np.array([[0, 3], [1, 0], [2, 0], [4, 0], [1, 0]], float)
    vids, vlabels, vlogits = video_level(ids, labels, logits)
    assert list(vids) == [b"v1", b"v2"] and list(vlabels) == [1, 0]
    np.testing.assert_allclose(vlogits, [[1, 1], [2.5, 0]])
    with pytest.raises(EvaluateError, match="different labels"):
        video_level(ids, np.array([1, 0, 0, 0, 1]), logits)


def test_evaluate_command_json_matches_the_model(tmp_path):
    from stpkeras.pipeline import make_dataset
    from stpkeras import artifacts
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools import schema

    data = str(tmp_path / "data")
    write_converted(data, {"train": random_items(48, (4, 8, 8, 3), seed=0),
                           "test": random_items(30, (4, 8, 8, 3), seed=2, videos=5)}, ("a", "b", "c"))
    run_dir = str(tmp_path / "run")
    train(TrainConfig.tiny(data, run_dir, val_split="none"), echo=lambda s: None)
    result = CliRunner().invoke(main, ["evaluate", run_dir, data, "--json", "--batch-size", "7"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for level in ("patch", "video"):
        assert {"accuracy", "precision", "recall", "f1", "per_class", "confusion"} <= set(report[level])
    assert report["split"] == "test" and report["patch"]["count"] == 30 and report["video"]["count"] == 5

    model = artifacts.load(run_dir).model
    expected_patch, videos = [], {}
    for f in make_dataset(data, "test", batch_size=30, as_supervised=False):
        logits = np.asarray(model(f[schema.PATCH]))
        for row, label, vid in zip(logits, f[schema.LABEL].numpy(), f[schema.VIDEO_ID].numpy()):
            expected_patch.append(row.argmax() == label)
            videos.setdefault(vid, [label, []])[1].append(row)
    assert report["patch"]["accuracy"] == pytest.approx(np.mean(expected_patch))
    video_hits = [np.mean(rows, axis=0).argmax() == label for label, rows in videos.values()]
    assert report["video"]["accuracy"] == pytest.approx(np.mean(video_hits))
    assert np.array(report["patch"]["confusion"]).sum() == 30
    assert (tmp_path / "run" / "eval-test.json").exists() and (tmp_path / "run" / "confusion-test-video.png").exists()

    table = CliRunner().invoke(main, ["evaluate", run_dir, data])
    assert table.exit_code == 0 and "video:" in table.output and "patch:" in table.output
    missing = CliRunner().invoke(main, ["evaluate", run_dir, data, "--split", "val"])
    assert missing.exit_code == 2 and "no split 'val'" in missing.output
