"""Tests of tfrecords_tools.sources: how folders and CSVs become the list of videos."""

import os

from tfrecords_tools.sources import assign_split, list_source


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_a_video_beside_class_folders_is_reported_not_a_reason_to_drop_the_labels(tmp_path):
    for cls in ("cats", "dogs"):
        _touch(str(tmp_path / cls / "x.mp4"))
    _touch(str(tmp_path / "stray.mp4"))
    items, labels = list_source(str(tmp_path))
    assert labels == ["cats", "dogs"]
    by_id = {i.id: i for i in items}
    assert by_id["cats/x.mp4"].label == "cats" and not by_id["cats/x.mp4"].error
    assert by_id["dogs/x.mp4"].label == "dogs" and not by_id["dogs/x.mp4"].error
    assert "stray.mp4" in by_id["stray.mp4"].error and "has no class" in by_id["stray.mp4"].error


def test_split_folders_above_class_folders(tmp_path):
    _touch(str(tmp_path / "train" / "a" / "1.mp4"))
    _touch(str(tmp_path / "validation" / "b" / "2.mp4"))
    items, labels = list_source(str(tmp_path))
    assert [(i.id, i.label, i.split) for i in items] == [("train/a/1.mp4", "a", "train"),
                                                          ("validation/b/2.mp4", "b", "val")]
    assert labels == ["a", "b"]


def test_split_fractions_are_deterministic_and_close_to_the_asked_share():
    ids = [f"class/{i:04d}.mp4" for i in range(2000)]
    first = [assign_split(i, (("val", 0.2),)) for i in ids]
    assert first == [assign_split(i, (("val", 0.2),)) for i in ids]
    share = first.count("val") / len(ids)
    assert 0.17 < share < 0.23, share
