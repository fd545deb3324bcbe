"""Source stage: standard annotation formats (Kinetics, UCF101, HMDB51, Something-Something v2, Charades),
each from a tiny fixture in its published layout, listed and (Kinetics, Charades) converted for real."""

import json
import os
import shutil

import pytest

from test_convert import records_of
from tfrecords_tools import schema
from tfrecords_tools.convert import ConvertConfig, convert
from tfrecords_tools.sources import SourceError, read_source
from tfrecords_tools.spec import PatchSpec

SPEC = PatchSpec(4, 16, 16)


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def _rows(source):
    return [(i.id, i.label, i.split, i.start, i.end, i.error) for i in source.items]


def test_kinetics_trimmed_clips_and_full_videos(tmp_path, clip2s, clip64):
    videos = tmp_path / "videos"
    # The downloaders' layout (split/class/ID_START_END.mp4) beside a full video named by its id.
    os.makedirs(videos / "train" / "abseiling")
    shutil.copy(clip64.path, videos / "train" / "abseiling" / "abc123_000010_000020.mp4")
    shutil.copy(clip2s.path, videos / "xyz789.mp4")
    ann = tmp_path / "kinetics400" / "train.csv"
    ann.parent.mkdir()
    ann.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                   "abseiling,abc123,10,20,train,0\n"
                   "air drumming,xyz789,0,1,train,0\n"
                   "\"air drumming\",xyz789,1,2,validate,0\n"
                   "abseiling,gone42,3,13,train,0\n")
    source = read_source(str(videos), annotations=f"kinetics:{ann}")
    assert source.labels == ("abseiling", "air drumming") and source.label_mode == "single"
    assert _rows(source) == [
        ("gone42#t=3,13", "abseiling", "train", None, None,
         f"{ann}:5: no video gone42_000003_000013 or gone42 below {videos}"),
        ("train/abseiling/abc123_000010_000020.mp4", "abseiling", "train", None, None, ""),
        ("xyz789.mp4#t=0,1", "air drumming", "train", 0.0, 1.0, ""),
        ("xyz789.mp4#t=1,2", "air drumming", "val", 1.0, 2.0, "")]
    m = convert(ConvertConfig(src=str(videos), out=str(tmp_path / "out"), spec=SPEC,
                              annotations=f"kinetics:{ann.parent}"))
    assert [(v["id"], v["status"], v["patches"]) for v in m["videos"]] == [
        ("gone42#t=3,13", "failed", 0), ("train/abseiling/abc123_000010_000020.mp4", "ok", 6 * 4 * 4),
        ("xyz789.mp4#t=0,1", "ok", 6 * 2 * 3), ("xyz789.mp4#t=1,2", "ok", 6 * 2 * 3)]
    ids = {schema.parse_patch_numpy(r)[schema.VIDEO_ID] for r in records_of(tmp_path / "out", m, "val")}
    assert ids == {"xyz789.mp4#t=1,2"}


def test_ucf101_fold(tmp_path):
    videos, lists = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyLipstick/v_ApplyLipstick_g01_c02.avi",
                "HandstandPushups/v_HandStandPushups_g01_c01.avi"):
        _touch(str(videos / rel))
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n3 HandstandPushups\n")
    (lists / "trainlist02.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
                                           "ApplyLipstick/v_ApplyLipstick_g01_c02.avi 2\n")
    (lists / "testlist02.txt").write_text("HandStandPushups/v_HandStandPushups_g01_c01.avi\n"
                                          "Archery/v_Archery_g01_c01.avi\n")
    (lists / "trainlist01.txt").write_text("")
    (lists / "testlist01.txt").write_text("")
    source = read_source(str(videos), annotations=f"ucf101:{lists}", fold=2)
    assert source.labels == ("ApplyEyeMakeup", "ApplyLipstick", "HandstandPushups")
    assert [(i.id, i.label, i.split, i.error.split(": ", 1)[-1]) for i in source.items] == [
        ("Archery/v_Archery_g01_c01.avi", "Archery", "test",
         "no video Archery/v_Archery_g01_c01.avi or v_Archery_g01_c01.avi below " + str(videos)),
        ("HandstandPushups/v_HandStandPushups_g01_c01.avi", "HandstandPushups", "test", ""),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyEyeMakeup", "train", ""),
        ("ApplyLipstick/v_ApplyLipstick_g01_c02.avi", "ApplyLipstick", "train", "")]
    with pytest.raises(SourceError, match="--fold 4: ucf101 has folds 1, 2 and 3"):
        read_source(str(videos), annotations=f"ucf101:{lists}", fold=4)


def test_hmdb51_split_files(tmp_path):
    videos, splits = tmp_path / "hmdb51", tmp_path / "testTrainMulti_7030_splits"
    for rel in ("brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "cartwheel/d.avi"):
        _touch(str(videos / rel))
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (splits / "cartwheel_test_split1.txt").write_text("d.avi 1 \n")
    (splits / "cartwheel_test_split2.txt").write_text("d.avi 2 \n")
    source = read_source(str(videos), annotations=f"hmdb51:{splits}")
    assert source.labels == ("brush_hair", "cartwheel")
    assert [(i.id, i.label, i.split, i.error) for i in source.items] == [
        ("brush_hair/b.avi", "brush_hair", "test", ""), ("brush_hair/a.avi", "brush_hair", "train", ""),
        ("cartwheel/d.avi", "cartwheel", "train", "")]
    assert [i.split for i in read_source(str(videos), annotations=f"hmdb51:{splits}", fold=2).items] == ["test"]


def test_something_something_v2(tmp_path):
    videos, ann = tmp_path / "20bn-something-something-v2", tmp_path / "labels"
    for vid in ("78687", "42326", "100"):
        _touch(str(videos / f"{vid}.webm"))
    ann.mkdir()
    (ann / "labels.json").write_text(json.dumps({"Holding something": "0", "Putting something on a surface": "1",
                                                 "Pushing something from left to right": "2"}))
    (ann / "train.json").write_text(json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle", "template": "Holding [something]",
         "placeholders": ["potato"]},
        {"id": "42326", "label": "putting a cup on a table", "template": "Putting [something] on a surface",
         "placeholders": ["a cup"]}]))
    (ann / "validation.json").write_text(json.dumps([
        {"id": "100", "label": "pushing a pen from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a pen"]},
        {"id": "101", "label": "x", "template": "Spinning [something]", "placeholders": ["x"]}]))
    source = read_source(str(videos), annotations=f"ssv2:{ann}")
    assert source.labels == ("Holding something", "Putting something on a surface",
                             "Pushing something from left to right")
    got = [(i.id, i.label, i.split, bool(i.error)) for i in source.items]
    assert got == [("42326.webm", "Putting something on a surface", "train", False),
                   ("78687.webm", "Holding something", "train", False),
                   ("100.webm", "Pushing something from left to right", "val", False),
                   ("101.webm", "", "val", True)]


def test_charades_one_multi_label_item_per_video(tmp_path, clip2s, clip64):
    videos, ann = tmp_path / "Charades_v1_480", tmp_path / "Charades"
    videos.mkdir()
    shutil.copy(clip2s.path, videos / "46GP8.mp4")
    shutil.copy(clip64.path, videos / "N11GT.mp4")
    ann.mkdir()
    header = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
    (ann / "Charades_v1_train.csv").write_text(
        header + '46GP8,HR43,Kitchen,6,7,Yes,"A person cooks.",food;stove,"A person cooks.",'
                 '"c002 0.00 1.20;c000 0.50 2.00;c002 1.00 1.90",2.0\n'
                 'N11GT,HR44,Bedroom,5,7,Yes,"Sits.",bed,"Sits.",,0.96\n')
    (ann / "Charades_v1_test.csv").write_text(header + 'ZZZZZ,HR45,Hall,5,7,Yes,"x",,"x","c001 0.0 1.0",5\n')
    (ann / "Charades_v1_classes.txt").write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\n"
                                                 "c002 Taking some clothes from somewhere\n")
    source = read_source(str(videos), annotations=f"charades:{ann}")
    assert source.label_mode == "multi" and source.labels == (
        "Holding some clothes", "Putting clothes somewhere", "Taking some clothes from somewhere")
    m = convert(ConvertConfig(src=str(videos), out=str(tmp_path / "out"), spec=SPEC,
                              annotations=f"charades:{ann}"))
    assert m["label_mode"] == "multi" and m["labels"] == list(source.labels)
    assert [(v["id"], v["split"], v["status"]) for v in m["videos"]] == [
        ("ZZZZZ.mp4", "test", "failed"), ("46GP8.mp4", "train", "ok"), ("N11GT.mp4", "train", "ok")]
    by_id = {}
    for r in records_of(tmp_path / "out", m, "train"):
        f = schema.parse_patch_numpy(r)
        by_id[f[schema.VIDEO_ID]] = f
    assert by_id["46GP8.mp4"][schema.MULTI_HOT] == [1, 0, 1]
    assert by_id["46GP8.mp4"][schema.LABEL_NAME] == "Holding some clothes;Taking some clothes from somewhere"
    assert by_id["N11GT.mp4"][schema.MULTI_HOT] == [0, 0, 0] and by_id["N11GT.mp4"][schema.LABEL] == -1


def test_bad_format_and_path_are_one_line(tmp_path):
    with pytest.raises(SourceError, match=r"expected FORMAT:PATH with FORMAT one of kinetics, ucf101, hmdb51, "
                                          r"ssv2, charades"):
        read_source(str(tmp_path), annotations="ava:x.csv")
    with pytest.raises(SourceError, match=r"nowhere.csv not found"):
        read_source(str(tmp_path), annotations="kinetics:nowhere.csv")


def test_stp_convert_annotations_and_sampling(tmp_path, clip2s, cli):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(clip2s.path, videos / "xyz789.mp4")
    ann = tmp_path / "val.csv"
    ann.write_text("label,youtube_id,time_start,time_end,split\nclap,xyz789,0,1.5,val\nclap,xyz789,1.8,9,val\n")
    result = cli("convert", videos, tmp_path / "out", "--patch", "4x16x16", "--annotations", f"kinetics:{ann}",
                 "--clips-per-video", "2", "--max-patches-per-video", "9", "-q")
    assert result.exit_code == 1, result.output
    m = json.loads((tmp_path / "out" / "dataset.json").read_text())
    ok, bad = m["videos"]
    assert (ok["id"], ok["patches"], ok["sampled"]) == (
        "xyz789.mp4#t=0,1.5", 9, {"clips": 2, "clip_starts": [0, 34], "max_patches": 9, "of": 12})
    assert bad["reason"] == f"{ann}:3: {videos / 'xyz789.mp4'}: segment 1.8-9s ends past the video's end at 2.000s"
