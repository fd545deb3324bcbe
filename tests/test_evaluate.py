"""Tests of stpkeras.evaluate: metrics on a hand-computed case, video-level averaging, and
`stp evaluate --json` on a real run checked against the model's own outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from converted import random_items, write_converted
from stpkeras.cli import main
from stpkeras.evaluate import (EvaluateError, classification_metrics, multilabel_metrics, regression_metrics,
                               video_level)


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


def test_multilabel_metrics_on_a_hand_computed_case():
    # Classes a, b, c; c has no positive: it has no AP and stays out of the mAP (listed, not NaN).
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0]])
    probs = np.array([[0.9, 0.2, 0.6], [0.8, 0.6, 0.1], [0.55, 0.7, 0.2], [0.1, 0.4, 0.3]])
    m = multilabel_metrics(targets, probs, ["a", "b", "c"])
    per = m["per_class"]
    # a ranked: 0.9 (+), 0.8 (-), 0.55 (+), 0.1 (-): AP = (1/1 + 2/3) / 2. b: its 3 positives rank first: AP 1.
    assert per["a"]["ap"] == pytest.approx(5 / 6) and per["b"]["ap"] == pytest.approx(1.0)
    assert per["c"]["ap"] is None and m["excluded_from_map"] == ["c"]
    assert m["map"] == pytest.approx((5 / 6 + 1) / 2)
    # At 0.5: a predicted on items 0, 1, 2 (TP 2, FP 1): P 2/3, R 1; b on 1, 2 (TP 2, FN 1): P 1, R 2/3;
    # c on item 0 only (FP 1): 0, 0.
    assert [per[c]["precision"] for c in "abc"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert [per[c]["recall"] for c in "abc"] == pytest.approx([1.0, 2 / 3, 0.0])
    assert [per[c]["f1"] for c in "abc"] == pytest.approx([0.8, 0.8, 0.0])
    assert m["f1"] == pytest.approx(1.6 / 3)
    # Micro: TP 4, FP 2, FN 1 -> P 2/3, R 4/5, F1 8/11. Exact sets: item 2 only.
    assert m["micro_f1"] == pytest.approx(8 / 11) and m["exact_match"] == pytest.approx(0.25)
    assert [per[c]["support"] for c in "abc"] == [2, 3, 0]
    # A higher threshold: a only on item 0 (P 1, R 1/2); the AP does not depend on it.
    high = multilabel_metrics(targets, probs, ["a", "b", "c"], threshold=0.85)
    assert high["per_class"]["a"]["f1"] == pytest.approx(2 / 3) and high["map"] == pytest.approx(m["map"])
    # No class with a positive: no mAP at all.
    assert multilabel_metrics(np.zeros((2, 2)), np.full((2, 2), 0.3), ["x", "y"])["map"] is None


def test_regression_metrics_on_a_hand_computed_case_with_ties():
    values = np.array([[1, 0, 5], [2, 1, 5], [2, 2, 5], [3, 3, 5]], float)
    predicted = np.array([[10, 0.5, 4], [20, 1, 5], [30, 2, 6], [100, 5, 7]], float)
    m = regression_metrics(values, predicted, ["tied", "b", "flat"])
    tied, b, flat = (m["per_value"][k] for k in ("tied", "b", "flat"))
    # Spearman with a tie: ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4 -> 4.5 / sqrt(4.5 x 5) = sqrt(0.9).
    assert tied["srocc"] == pytest.approx(np.sqrt(0.9))
    # Pearson: deviations (-1, 0, 0, 1) and (-30, -20, -10, 60): 90 / sqrt(2 x 5000) = 0.9.
    assert tied["plcc"] == pytest.approx(0.9)
    # b: errors 0.5, 0, 0, 2: MAE 0.625, RMSE sqrt(4.25 / 4); same order: SROCC 1.
    assert b["mae"] == pytest.approx(0.625) and b["rmse"] == pytest.approx(np.sqrt(4.25 / 4))
    assert b["srocc"] == pytest.approx(1.0)
    dy, dp = np.array([-1.5, -0.5, 0.5, 1.5]), np.array([-1.625, -1.125, -0.125, 2.875])
    assert b["plcc"] == pytest.approx(dy @ dp / np.sqrt((dy @ dy) * (dp @ dp)))
    # A constant true value has no correlation: None, and named (not NaN in silence).
    assert flat["srocc"] is None and flat["plcc"] is None and m["undefined_correlations"] == ["flat"]
    assert flat["mae"] == pytest.approx(1.0) and flat["rmse"] == pytest.approx(np.sqrt(1.5))
    # The means over values leave out what is undefined.
    assert m["srocc"] == pytest.approx((np.sqrt(0.9) + 1) / 2) and m["mae"] == pytest.approx((152 / 4 + 0.625 + 1) / 3)


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


def test_evaluate_multi_label_and_regression_runs_against_the_models_outputs(target_runs, tmp_path):
    """`stp evaluate --json` of a multi-label and a regression run: the figures scikit-learn and scipy give
    on the model's own outputs, at patch level and per video (mean of its patches' probabilities or values)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import average_precision_score

    from stpkeras import artifacts
    from stpkeras.pipeline import make_dataset
    from targets import CLASSES, VALUE_NAMES
    from tfrecords_tools import schema

    data, multi, regress = target_runs
    batches = list(make_dataset(data, "test", batch_size=30, as_supervised=False))
    assert len(batches) == 1
    f = batches[0]
    ids = f[schema.VIDEO_ID].numpy()

    r = CliRunner().invoke(main, ["evaluate", multi, data, "--json", "--threshold", "0.4", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["multi_label"] and report["labels"] == list(CLASSES) and report["patch"]["threshold"] == 0.4
    probs = 1 / (1 + np.exp(-np.asarray(artifacts.load(multi).model(f[schema.PATCH]), np.float64)))
    targets = f[schema.MULTI_HOT].numpy()
    aps = [average_precision_score(targets[:, c], probs[:, c]) for c in range(3)]
    assert report["patch"]["map"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert [report["patch"]["per_class"][c]["ap"] for c in CLASSES] == pytest.approx(aps, abs=1e-6)
    assert report["patch"]["count"] == 30 and report["video"]["count"] == 6
    video_probs = np.array([probs[ids == v].mean(axis=0) for v in sorted(set(ids), key=list(ids).index)])
    video_targets = np.array([targets[ids == v][0] for v in sorted(set(ids), key=list(ids).index)])
    assert report["video"]["map"] == pytest.approx(
        np.mean([average_precision_score(video_targets[:, c], video_probs[:, c]) for c in range(3)]), abs=1e-6)
    # The model learnt the classes from brightness (chance: each class's share of positives, 0.33 to 0.67).
    assert report["video"]["map"] > 0.9
    table = CliRunner().invoke(main, ["evaluate", multi, data, "--out", str(tmp_path)])
    assert table.exit_code == 0 and "mAP" in table.output and "AP" in table.output

    r = CliRunner().invoke(main, ["evaluate", regress, data, "--json", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["task"] == "regress" and report["labels"] == list(VALUE_NAMES)
    values = np.asarray(artifacts.load(regress).model(f[schema.PATCH]), np.float64)
    truth = f[schema.VALUES].numpy().astype(np.float64)
    for k, name in enumerate(VALUE_NAMES):
        got = report["patch"]["per_value"][name]
        assert got["mae"] == pytest.approx(np.abs(values[:, k] - truth[:, k]).mean(), rel=1e-5)
        assert got["rmse"] == pytest.approx(np.sqrt(((values[:, k] - truth[:, k]) ** 2).mean()), rel=1e-5)
        assert got["srocc"] == pytest.approx(spearmanr(truth[:, k], values[:, k]).statistic, abs=1e-6)
        assert got["plcc"] == pytest.approx(pearsonr(truth[:, k], values[:, k]).statistic, abs=1e-6)
    # In the data's units: the videos' brightness (30 to 174) is off by under half of what predicting its
    # mean, 102, would be off by (47.3).
    assert report["video"]["per_value"]["brightness"]["mae"] < 24 and report["video"]["srocc"] > 0.8
    table = CliRunner().invoke(main, ["evaluate", regress, data, "--out", str(tmp_path)])
    assert table.exit_code == 0 and "SROCC" in table.output and "brightness" in table.output
