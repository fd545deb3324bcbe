"""Spec stage: `PatchSpec` checks its arguments, round-trips through JSON, and derives frame sizes."""

import json

import pytest

from tfrecords_tools.spec import PatchSpec, parse_pair, parse_triple


def test_defaults_stride_to_patch_size():
    spec = PatchSpec(8, 32, 48)
    assert spec.stride == (8, 32, 48)
    assert spec.shape == (8, 32, 48, 3)
    assert spec.size == (8, 32, 48)
    assert spec.num_values == 8 * 32 * 48 * 3
    assert spec.pad == "drop" and spec.fps is None and spec.resize is None and spec.short_side is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames=0, height=8, width=8),
     "Invalid value for argument `frames`. Expected a strictly positive integer. Received frames=0"),
    (dict(frames=4, height=-1, width=8),
     "Invalid value for argument `height`. Expected a strictly positive integer. Received height=-1"),
    (dict(frames=4, height=8, width=8.0),
     "Invalid value for argument `width`. Expected a strictly positive integer. Received width=8.0"),
    (dict(frames=True, height=8, width=8),
     "Invalid value for argument `frames`. Expected a strictly positive integer. Received frames=True"),
    (dict(frames=4, height=8, width=8, channels=1),
     "Invalid value for argument `channels`. Expected 3 (frames are converted to RGB). Received channels=1"),
    (dict(frames=4, height=8, width=8, stride_frames=0),
     "Invalid value for argument `stride_frames`. Expected a strictly positive integer. Received stride_frames=0"),
    (dict(frames=4, height=8, width=8, stride_width="2"),
     "Invalid value for argument `stride_width`. Expected a strictly positive integer. Received stride_width='2'"),
    (dict(frames=4, height=8, width=8, pad="reflect"),
     "Invalid value for argument `pad`. Expected one of ('drop', 'edge', 'zero'). Received pad='reflect'"),
    (dict(frames=4, height=8, width=8, fps=0),
     "Invalid value for argument `fps`. Expected a frame rate in (0, 1000]. Received fps=0"),
    (dict(frames=4, height=8, width=8, fps=1001.0),
     "Invalid value for argument `fps`. Expected a frame rate in (0, 1000]. Received fps=1001.0"),
    (dict(frames=4, height=8, width=8, resize=(4, 16)),
     "Invalid value for argument `resize`. Expected a frame at least as large as the patch (8x8). "
     "Received resize=(4, 16)"),
    (dict(frames=4, height=8, width=8, resize=(16,)),
     "Invalid value for argument `resize`. Expected (height, width), two strictly positive integers. "
     "Received resize=(16,)"),
    (dict(frames=4, height=8, width=8, short_side=0),
     "Invalid value for argument `short_side`. Expected a strictly positive integer. Received short_side=0"),
    (dict(frames=4, height=8, width=8, resize=(16, 16), short_side=16),
     "Invalid arguments: `resize` and `short_side` are exclusive. Received resize=(16, 16), short_side=16"),
])
def test_invalid_arguments_say_what_was_expected_and_received(kwargs, message):
    with pytest.raises(ValueError) as info:
        PatchSpec(**kwargs)
    assert str(info.value) == message


def test_is_frozen():
    spec = PatchSpec(4, 8, 8)
    with pytest.raises(AttributeError):
        spec.frames = 5


@pytest.mark.parametrize("spec", [
    PatchSpec(8, 64, 64),
    PatchSpec(4, 16, 24, stride_frames=2, stride_height=8, stride_width=30, pad="edge", fps=12.5, resize=(90, 120)),
    PatchSpec(16, 112, 112, pad="zero", short_side=128),
])
def test_json_round_trip(spec):
    text = spec.to_json()
    assert json.loads(text) == spec.to_dict()
    back = PatchSpec.from_json(text)
    assert back == spec
    assert back.resize == spec.resize and (back.resize is None or isinstance(back.resize, tuple))
    assert back.to_json() == text


def test_from_dict_refuses_unknown_keys_and_rechecks_values():
    d = PatchSpec(4, 8, 8).to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        PatchSpec.from_dict({**d, "colour": "red"})
    with pytest.raises(ValueError, match="Received pad='mirror'"):
        PatchSpec.from_dict({**d, "pad": "mirror"})


def test_fps_is_stored_as_float():
    spec = PatchSpec(4, 8, 8, fps=15)
    assert spec.fps == 15.0 and isinstance(spec.fps, float)


def test_from_strings():
    spec = PatchSpec.from_strings("8x64x48", "4x32x16", pad="edge")
    assert spec.size == (8, 64, 48)
    assert spec.stride == (4, 32, 16)
    assert spec.pad == "edge"
    assert PatchSpec.from_strings(" 2X3,5 ").size == (2, 3, 5)
    assert PatchSpec.from_strings("2x3x5").stride == (2, 3, 5)


@pytest.mark.parametrize("text", ["8x64", "8x64x64x3", "axbxc", "", "8x-1x4"])
def test_from_strings_refuses_malformed_patch(text):
    with pytest.raises(ValueError, match=r"Invalid value for argument `patch`. Expected three integers written "
                                         r"TxHxW, e.g. 8x64x64. Received patch="):
        PatchSpec.from_strings(text)


def test_parse_pair_and_triple_name_the_argument():
    assert parse_pair("128x171") == (128, 171)
    assert parse_triple("1x2x3") == (1, 2, 3)
    with pytest.raises(ValueError, match=r"argument `stride`.*Received stride='3x3'"):
        parse_triple("3x3", "stride")
    with pytest.raises(ValueError, match=r"argument `resize`.*Received resize='128'"):
        parse_pair("128")


@pytest.mark.parametrize("short_side, frame, expected", [
    (128, (240, 320), (128, 170)),   # 320 * 128/240 = 170.67 -> nearest even 170
    (128, (320, 240), (170, 128)),   # portrait: the width is the short side
    (32, (50, 70), (32, 44)),        # 70 * 32/50 = 44.8 -> 44 (nearest even: 44.8/2 = 22.4 -> 22)
    (33, (100, 200), (33, 66)),      # the short side is exactly N, even when odd
    (64, (64, 64), (64, 64)),        # square stays square
    (100, (720, 1280), (100, 178)),  # 1280 * 100/720 = 177.8 -> 178
    (240, (240, 320), (240, 320)),   # already that size
])
def test_frame_size_short_side_keeps_aspect_ratio(short_side, frame, expected):
    assert PatchSpec(1, 8, 8, short_side=short_side).frame_size(*frame) == expected


def test_frame_size_resize_and_none():
    assert PatchSpec(1, 8, 8, resize=(40, 60)).frame_size(480, 640) == (40, 60)
    assert PatchSpec(1, 8, 8).frame_size(45, 71) == (45, 71)


def test_describe_mentions_every_choice():
    text = PatchSpec(4, 16, 16, stride_frames=2, pad="edge", fps=12.5, resize=(32, 48)).describe()
    assert text == "patch 4x16x16, stride 2x16x16, pad edge, 12.5 fps, resize 32x48"
