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


def test_csv_header_is_case_insensitive(tmp_path):
    _touch(str(tmp_path / "a.mp4"))
    (tmp_path / "list.csv").write_text("Path,Label,Split\na.mp4,run,val\n")
    items, labels = list_source(str(tmp_path / "list.csv"))
    assert [(i.id, i.label, i.split, i.error) for i in items] == [("a.mp4", "run", "val", "")]
    assert labels == ["run"]


def test_an_absolute_path_inside_the_csv_folder_is_accepted_and_one_outside_is_not(tmp_path):
    _touch(str(tmp_path / "src" / "clips" / "a.mp4"))
    _touch(str(tmp_path / "outside.mp4"))
    (tmp_path / "src" / "list.csv").write_text(
        f"path,label\n{tmp_path / 'src' / 'clips' / 'a.mp4'},x\n{tmp_path / 'outside.mp4'},x\n")
    items, _ = list_source(str(tmp_path / "src" / "list.csv"))
    by_line = {i.line: i for i in items}
    assert by_line[2].id == "clips/a.mp4" and by_line[2].error == ""
    assert by_line[3].error.endswith(f"escapes the CSV's folder {tmp_path / 'src'}")


def test_a_video_listed_twice_names_both_csv_lines(tmp_path):
    _touch(str(tmp_path / "a.mp4"))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\na.mp4,x\nb.mp4,\n./a.mp4,y\n")
    items, _ = list_source(str(csv_path))
    twice = next(i for i in items if "listed twice" in i.error)
    assert twice.error == f"{csv_path}:4: {tmp_path / 'a.mp4'}: listed twice in split 'train' (first on line 2)"


def test_labels_differing_only_by_case_are_warned_about(tmp_path):
    from tfrecords_tools.sources import label_clashes

    for cls in ("Left", "left", "right"):
        _touch(str(tmp_path / cls / "x.mp4"))
    _, labels = list_source(str(tmp_path))
    assert labels == ["Left", "left", "right"]
    assert label_clashes(labels) == ["labels 'Left' and 'left' differ only by case: they are 2 classes "
                                     "(pass --labels to fix the set)"]
    assert label_clashes(["left", "right"]) == []
