"""Tests of stpkeras.pipeline and stpkeras.augment: each function eagerly and inside `Dataset.map`,
and `make_dataset` on real TFRecords (order, completeness, cardinality, determinism, sharding)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from converted import random_items, write_converted
from stpkeras import augment, pipeline
from tfrecords_tools import manifest, schema
from tfrecords_tools.spec import PatchSpec

SHAPE = (4, 8, 8, 3)
LABELS = ("a", "b", "c")


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("converted"))
    items = {"train": random_items(50, SHAPE, seed=0), "val": random_items(13, SHAPE, seed=1)}
    write_converted(root, items, LABELS, shards=3)
    return root, items


def _patch(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- augmentations -----------------------------------------------------------------------------

def _in_map(fn, patch, seed):
    ds = tf.data.Dataset.from_tensors((patch, seed)).map(fn)
    return next(iter(ds)).numpy()


@pytest.mark.parametrize("mode", ["eager", "map"])
def test_flip_reverses_width_or_keeps_the_clip_and_is_seeded(mode):
    patch = _patch()
    outs = []
    for s in range(16):
        seed = tf.constant([s, 7], tf.int64)
        out = augment.random_flip(patch, seed).numpy() if mode == "eager" else _in_map(augment.random_flip, patch, seed)
        assert out.dtype == np.uint8
        assert np.array_equal(out, patch) or np.array_equal(out, patch[:, :, ::-1])
        again = augment.random_flip(patch, seed).numpy()
        assert np.array_equal(out, again)
        outs.append(np.array_equal(out, patch))
    assert 0 < sum(outs) < 16  # both outcomes happen


def test_batch_flip_equals_the_flip_of_each_patch_with_its_seed():
    patches = np.stack([_patch(i) for i in range(12)])
    seeds = tf.constant([[s, 7] for s in range(12)], tf.int64)
    batch_fn = augment.make_batch_augment("flip")
    one_fn = augment.make_augment("flip")
    want = np.stack([one_fn(tf.constant(p), seeds[i]).numpy() for i, p in enumerate(patches)])
    assert np.array_equal(batch_fn(tf.constant(patches), seeds).numpy(), want)
    flipped = [not np.array_equal(w, p) for w, p in zip(want, patches)]
    assert 0 < sum(flipped) < 12  # both outcomes happen
    # Static batch (unrolled) and unknown batch size (map_fn) alike.
    ds = tf.data.Dataset.from_tensors((patches, seeds))
    assert np.array_equal(next(iter(ds.map(batch_fn))).numpy(), want)
    unknown = ds.unbatch().batch(12).map(batch_fn)
    assert unknown.element_spec.shape[0] is None
    assert np.array_equal(next(iter(unknown)).numpy(), want)
    # Only ops with a batch form take the batched path.
    assert augment.make_batch_augment("flip,crop") is None and augment.make_batch_augment("none") is None


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_make_dataset_flips_a_batch_as_it_flips_record_by_record(folder, monkeypatch, drop_remainder):
    """The batched flip (raw records) gives the batches of the per-record path, seed for seed."""
    root, _ = folder

    def batches():
        ds = pipeline.make_dataset(root, "train", batch_size=8, training=True, augment="flip", seed=3,
                                   deterministic=True, drop_remainder=drop_remainder)
        return [(x.numpy(), y.numpy()) for x, y in ds]

    batched = batches()
    monkeypatch.setattr(augment, "make_batch_augment", lambda names, pixels="rgb": None)
    per_record = batches()
    assert len(batched) == len(per_record) == (50 // 8 if drop_remainder else -(-50 // 8))
    for (xa, ya), (xb, yb) in zip(batched, per_record):
        assert np.array_equal(ya, yb) and np.array_equal(xa, xb)


def test_stp_runs_with_one_malloc_arena_unless_the_environment_says_otherwise():
    import subprocess
    import sys

    code = "from stpkeras.allocator import one_malloc_arena; print(one_malloc_arena())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "MALLOC_ARENA_MAX": "4"})
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("mode", ["eager", "map"])
def test_crop_takes_one_window_for_all_frames_and_keeps_the_shape(mode):
    # Every pixel holds its own (row, column) code, so the crop window can be read back.
    h, w = 16, 16
    rows, cols = np.mgrid[0:h, 0:w]
    frame = np.stack([rows * 10, cols * 10, np.zeros_like(rows)], -1).astype(np.uint8)
    patch = np.repeat(frame[None], 4, axis=0)
    seed = tf.constant([3, 4], tf.int64)
    fn = lambda p, s: augment.random_crop(p, s, min_scale=0.5)  # noqa: E731
    out = fn(patch, seed).numpy() if mode == "eager" else _in_map(fn, patch, seed)
    assert out.shape == patch.shape and out.dtype == np.uint8
    assert all(np.array_equal(out[0], out[t]) for t in range(4))  # the same window in every frame
    src_rows, src_cols = out[..., 0] // 10, out[..., 1] // 10
    # Nearest-neighbour: a monotone map of a window of at least half the side.
    assert np.all(np.diff(src_rows[0], axis=0) >= 0) and np.all(np.diff(src_cols[0], axis=1) >= 0)
    assert src_rows.max() - src_rows.min() + 1 >= h // 2 and src_cols.max() - src_cols.min() + 1 >= w // 2
    assert np.array_equal(out, fn(patch, seed).numpy())


@pytest.mark.parametrize("mode", ["eager", "map"])
def test_color_changes_brightness_and_contrast_for_the_whole_clip(mode):
    patch = np.full(SHAPE, 100, np.uint8)
    patch[:, :, :4] = 140  # mean 120 per channel
    seed = tf.constant([1, 2], tf.int64)
    fn = lambda p, s: augment.random_color(p, s, brightness=0.1, contrast=(0.5, 0.5))  # noqa: E731
    out = (fn(patch, seed).numpy() if mode == "eager" else _in_map(fn, patch, seed)).astype(int)
    delta = out[0, 0, 4, 0] - 110  # 100 -> 120 + (100 - 120) * 0.5 + delta
    assert abs(delta) <= 26
    assert np.all(out[:, :, :4] == 130 + delta) and np.all(out[:, :, 4:] == 110 + delta)


@pytest.mark.parametrize("mode", ["eager", "map"])
def test_crop_is_a_nearest_neighbour_resize_of_one_window(mode):
    patch = _patch(seed=4, shape=(3, 8, 8, 3))
    seed = tf.constant([5, 6], tf.int64)
    fn = lambda p, s: augment.random_crop(p, s, min_scale=0.5)  # noqa: E731
    out = fn(patch, seed).numpy() if mode == "eager" else _in_map(fn, patch, seed)
    windows = [(top, h, left, w) for h in range(4, 9) for w in range(4, 9)
               for top in range(0, 9 - h) for left in range(0, 9 - w)]
    matches = [win for win in windows if np.array_equal(out, tf.image.resize(
        patch[:, win[0]:win[0] + win[1], win[2]:win[2] + win[3]], (8, 8), method="nearest").numpy())]
    assert matches  # what tf.image.resize gives for a window of the patch


@pytest.mark.parametrize("mode", ["eager", "map"])
def test_color_is_one_affine_map_around_the_clip_mean(mode):
    patch = _patch(seed=5, shape=(4, 8, 8, 3))
    seed = tf.constant([7, 8], tf.int64)
    fn = lambda p, s: augment.random_color(p, s, brightness=0.0, contrast=(1.2, 1.2))  # noqa: E731
    out = (fn(patch, seed).numpy() if mode == "eager" else _in_map(fn, patch, seed)).astype(int)
    mean = patch.mean()  # over frames, pixels and channels
    expected = np.clip(np.floor((patch - mean) * 1.2 + mean + 0.5), 0, 255)
    assert out.dtype == np.int64 and np.abs(out - expected).max() <= 1 and (out != expected).mean() < 0.01
    assert np.array_equal(fn(patch, seed).numpy(), fn(patch, seed).numpy())


def test_ops_keep_extra_channels_together():
    # The enhance task augments input and target stacked along channels: one draw must cover both.
    patch = _patch(seed=6, shape=(3, 8, 8, 3))
    both = np.concatenate([patch, patch], axis=-1)
    for op in augment.AUGMENTATIONS.values():
        for s in range(4):
            out = op(both, tf.constant([s, 1], tf.int64)).numpy()
            assert out.shape == both.shape and np.array_equal(out[..., :3], out[..., 3:])


def test_parse_augment_names_and_errors():
    assert augment.parse_augment("flip, crop,color") == ("flip", "crop", "color")
    assert augment.parse_augment("none") == () and augment.parse_augment("") == ()
    with pytest.raises(ValueError, match="Received augment='blur'"):
        augment.parse_augment("blur")
    assert augment.make_augment(["color", "flip"]).names == ("flip", "color")


# --- parse and decode --------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_parse_and_decode_eagerly_and_in_map(encoding):
    pixels = _patch(shape=(3, 16, 16, 3)) if encoding != "jpeg" else np.full((3, 16, 16, 3), 90, np.uint8)
    record = schema.encode_patch(pixels, encoding=encoding, video_id="x/v.mp4", video_size=(9, 16, 16),
                                 index=(1, 0, 0), offset=(3, 0, 0), valid=(3, 16, 16), timestamp=0.5, label=2,
                                 label_name="c", split="train")
    spec = PatchSpec(3, 16, 16)

    def chain(serialized):
        return pipeline.decode(pipeline.parse(serialized, encoding), encoding, spec)

    eager = chain(tf.constant(record))
    mapped = next(iter(tf.data.Dataset.from_tensors(record).map(chain)))
    for f in (eager, mapped):
        assert set(f) == set(pipeline.FEATURE_KEYS)
        assert f[schema.PATCH].dtype == tf.uint8 and f[schema.PATCH].shape == (3, 16, 16, 3)
        got = f[schema.PATCH].numpy().astype(int)
        assert np.abs(got - pixels).max() <= (2 if encoding == "jpeg" else 0)
        assert f[schema.LABEL].numpy() == 2 and f[schema.LABEL].dtype == tf.int32
        assert f[schema.VIDEO_ID].numpy() == b"x/v.mp4"
        assert list(f[schema.OFFSET].numpy()) == [3, 0, 0]


@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_parse_and_decode_a_batch_eagerly_and_in_map(encoding):
    spec = PatchSpec(3, 16, 16)
    patches = [_patch(seed=i, shape=spec.shape) if encoding != "jpeg" else np.full(spec.shape, 30 * i, np.uint8)
               for i in range(4)]
    records = [schema.encode_patch(p, encoding=encoding, video_id=f"v{i}.mp4", video_size=(9, 16, 16),
                                   index=(i, 0, 0), offset=(3 * i, 0, 0), valid=spec.shape[:3], timestamp=0.0,
                                   label=i % 3) for i, p in enumerate(patches)]
    keys = (schema.PATCH, schema.LABEL)

    def chain(serialized):
        return pipeline.decode(pipeline.parse(serialized, encoding, keys), encoding, spec)

    eager = chain(tf.constant(records))
    mapped = next(iter(tf.data.Dataset.from_tensors(records).map(chain)))
    one_by_one = [chain(tf.constant(r)) for r in records]
    for f in (eager, mapped):
        assert set(f) == set(keys)  # only what was asked for is parsed
        assert f[schema.PATCH].dtype == tf.uint8 and f[schema.PATCH].shape == (4, *spec.shape)
        assert np.array_equal(f[schema.PATCH].numpy(), np.stack([g[schema.PATCH].numpy() for g in one_by_one]))
        assert np.abs(f[schema.PATCH].numpy().astype(int) - np.stack(patches)).max() <= (2 if encoding == "jpeg" else 0)
        assert list(f[schema.LABEL].numpy()) == [0, 1, 2, 0] and f[schema.LABEL].dtype == tf.int32


def test_local_shards_are_read_without_a_buffer():
    assert pipeline.read_buffer_size("/data/converted") == 0
    assert pipeline.read_buffer_size("file:///data/converted") == 0
    assert pipeline.read_buffer_size("gs://bucket/converted") is None


# --- make_dataset ------------------------------------------------------------------------------

def test_evaluation_yields_every_record_once_with_its_label_and_video(folder):
    root, items = folder
    ds = pipeline.make_dataset(root, "train", batch_size=8, as_supervised=False)
    assert ds.cardinality().numpy() == 7  # ceil(50 / 8), from the manifest
    seen = []
    for f in ds:
        for pixels, label, vid in zip(f[schema.PATCH].numpy(), f[schema.LABEL].numpy(), f[schema.VIDEO_ID].numpy()):
            seen.append((_digest(pixels), int(label), vid.decode()))
    assert sorted(seen) == sorted((_digest(p), label, v) for p, label, v in items["train"])
    assert len(list(ds)) == 7


def test_training_batches_are_static_shuffled_and_deterministic_with_a_seed(folder):
    root, items = folder
    kwargs = dict(batch_size=8, training=True, augment="flip,crop,color", seed=5, deterministic=True)
    ds = pipeline.make_dataset(root, "train", **kwargs)
    assert ds.cardinality().numpy() == 6  # 50 // 8: the last partial batch is dropped
    assert ds.element_spec[0].shape == (8, *SHAPE) and ds.element_spec[0].dtype == tf.uint8
    first = [(x.numpy(), y.numpy()) for x, y in ds]
    second_epoch = [(x.numpy(), y.numpy()) for x, y in ds]
    rebuilt = [(x.numpy(), y.numpy()) for x, y in pipeline.make_dataset(root, "train", **kwargs)]
    other = [(x.numpy(), y.numpy()) for x, y in pipeline.make_dataset(root, "train", **{**kwargs, "seed": 6})]
    assert len(first) == 6
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, rebuilt))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, second_epoch))  # reshuffled each epoch
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    order = [int(y) for _, ys in first for y in ys]
    assert order != sorted(order) or len(set(order)) == 1


def test_deterministic_without_augmentation_gives_the_same_batches(folder):
    # Without augmentation raw records are batched before parsing: a different chain, the same promise.
    root, _ = folder
    kwargs = dict(batch_size=8, training=True, seed=3, deterministic=True, as_supervised=False)
    runs = [[(f[schema.PATCH].numpy(), f[schema.VIDEO_ID].numpy())
             for f in pipeline.make_dataset(root, "train", **kwargs)] for _ in range(2)]
    assert len(runs[0]) == 6
    assert all(np.array_equal(a[0], b[0]) and list(a[1]) == list(b[1]) for a, b in zip(*runs))


def test_training_without_augmentation_keeps_pixels_and_labels_together(folder):
    root, items = folder
    labels = {_digest(p): label for p, label, _ in items["train"]}
    ds = pipeline.make_dataset(root, "train", batch_size=10, training=True, seed=1)
    pairs = [(_digest(x), int(y)) for xs, ys in ds for x, y in zip(xs.numpy(), ys.numpy())]
    assert len(pairs) == 50 and len({d for d, _ in pairs}) == 50
    assert all(labels[d] == y for d, y in pairs)


@pytest.mark.parametrize("shuffle_buffer", [16, 1024])
def test_the_repeated_training_stream_is_a_function_of_the_seed(folder, shuffle_buffer):
    """Every epoch in a new order, and the same stream from a second iterator (what `fit` and a resumed
    run rely on); over the first epochs every record comes."""
    root, items = folder

    def epochs(count):
        ds = pipeline.make_dataset(root, "train", batch_size=10, training=True, repeat=True, seed=5,
                                   deterministic=True, shuffle_buffer=shuffle_buffer)
        batches = iter(ds)
        return [[_digest(x) for _ in range(5) for x in next(batches)[0].numpy()] for _ in range(count)]

    first = epochs(4)
    assert first[0] != first[1] != first[2]
    assert set().union(*first) == {_digest(p) for p, _, _ in items["train"]}
    assert epochs(2) == first[:2]


def test_repeat_and_several_splits(folder):
    root, _ = folder
    ds = pipeline.make_dataset(root, ["train", "val"], batch_size=9, as_supervised=False)
    assert ds.cardinality().numpy() == 7  # ceil(63 / 9)
    assert sum(int(f[schema.LABEL].shape[0]) for f in ds) == 63
    forever = pipeline.make_dataset(root, "all", batch_size=9, training=True, repeat=True, seed=0)
    assert forever.cardinality().numpy() == tf.data.INFINITE_CARDINALITY
    assert len(list(forever.take(20))) == 20


def test_global_batch_and_shard_policy_under_a_strategy(folder):
    root, _ = folder
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    ds = pipeline.make_dataset(root, "train", batch_size=4, training=True, strategy=strategy, seed=0)
    assert ds.element_spec[0].shape[0] == 4 * strategy.num_replicas_in_sync
    policy = tf.data.experimental.AutoShardPolicy
    assert ds.options().experimental_distribute.auto_shard_policy == policy.FILE  # 3 shards, 1 worker
    assert pipeline.shard_policy(3, 2) == policy.FILE and pipeline.shard_policy(3, 3) == policy.FILE
    assert pipeline.shard_policy(2, 3) == policy.DATA

    class MultiWorker:  # what num_workers reads from a MultiWorkerMirroredStrategy
        cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"chief": ["h0:1"], "worker": ["h1:1", "h2:1", "h3:1"]}))
    assert pipeline.num_workers(MultiWorker()) == 4 and pipeline.num_workers(strategy) == 1


def test_gzip_and_jpeg_folders(tmp_path):
    items = random_items(12, (2, 8, 8, 3), seed=3)
    write_converted(str(tmp_path / "gz"), {"train": items}, LABELS, compression="gzip", shards=2)
    got = [_digest(x) for xs, _ in pipeline.make_dataset(str(tmp_path / "gz"), "train", batch_size=5)
           for x in xs.numpy()]
    assert sorted(got) == sorted(_digest(p) for p, _, _ in items)
    flat = [(np.full((2, 8, 8, 3), 40 * i, np.uint8), i % 3, f"v{i}") for i in range(6)]
    write_converted(str(tmp_path / "jpg"), {"train": flat}, LABELS, encoding="jpeg", shards=1)
    xs = np.concatenate([x.numpy() for x, _ in pipeline.make_dataset(str(tmp_path / "jpg"), "train", batch_size=4)])
    assert np.allclose(sorted(x.mean() for x in xs), [0, 40, 80, 120, 160, 200], atol=2)  # jpeg is lossy


def test_errors_name_the_folder_and_what_was_expected(folder, tmp_path):
    root, _ = folder
    with pytest.raises(manifest.ManifestError, match="no split 'test'"):
        pipeline.make_dataset(root, "test")
    with pytest.raises(manifest.ManifestError, match="the model expects 8x8x8x3"):
        pipeline.make_dataset(root, "train", spec=PatchSpec(8, 8, 8))
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.make_dataset(root, "val", batch_size=64, training=True)
    with pytest.raises(manifest.ManifestError, match="no manifest"):
        pipeline.make_dataset(str(tmp_path))


# --- flips that swap motion labels ---------------------------------------------------------------

MOTIONS = {"down": (1, 0), "left": (0, -1), "right": (0, 1), "still": (0, 0), "up": (-1, 0)}


def _moving_dot(dy, dx, seed):
    """uint8 [4, 8, 8, 3]: a bright dot at a random start moving (dy, dx) pixels a frame, on a dark random field."""
    rng = np.random.default_rng(seed)
    patch = rng.integers(0, 40, (4, 8, 8, 3), dtype=np.uint8)
    y, x = rng.integers(3, 5, 2)   # 3 steps either way stay inside the 8x8 frame
    for t in range(4):
        patch[t, y + dy * t, x + dx * t] = 255
    return patch


def _motion_of(patch):
    """The label the dot's path in `patch` says (where the brightest pixel goes from first to last frame)."""
    first, last = (np.array(np.unravel_index(np.argmax(patch[t].sum(-1)), (8, 8))) for t in (0, -1))
    step = tuple(int(v) for v in np.sign(last - first))
    return next(name for name, move in MOTIONS.items() if move == step)


@pytest.mark.parametrize("flips", [("h:left=right", "v:up=down"),
                                   ("h:left=right", "v:up=down", "t:left=right", "t:up=down"),
                                   ("h:left=right", "v:up=down", "d:left=up", "d:right=down")])
def test_label_flips_swap_the_labels_with_the_motion(tmp_path, flips):
    from stpkeras.tasks import get_task

    labels = tuple(MOTIONS)
    items = [(_moving_dot(*MOTIONS[name], seed=i), labels.index(name), f"v{i}")
             for i, name in enumerate(labels * 8)]
    assert all(_motion_of(p) == labels[label] for p, label, _ in items)
    write_converted(str(tmp_path), {"train": items}, labels, shards=1)
    info = pipeline.load_info(str(tmp_path))
    task = get_task("classify", {"flip_labels": flips}).for_data(info)
    element = task.element_fn(info, (), training=True)
    assert task.element_fn(info, (), training=False) is None   # evaluation sees the records as they are
    ds = pipeline.make_dataset(info, "train", batch_size=8, training=True, element_fn=element, seed=3)
    seen = [(p, int(y)) for patches, ys in ds for p, y in zip(patches.numpy(), ys.numpy())]
    assert len(seen) == len(items)
    # Every patch's label is still what its motion says, and the flips did swap some.
    assert all(_motion_of(p) == labels[y] for p, y in seen)
    originals = {_digest(p) for p, _, _ in items}
    assert sum(_digest(p) not in originals for p, _ in seen) >= 20    # 3/4 (7/8 with t) of 40 flipped at least once


def test_test_time_flips_average_the_logits_in_each_clips_own_classes():
    """`--tta` (`augment.flip_averaged`): the mean of the model's logits over the clip and its flips, each
    flip's put back in the clip's class order. Whatever the model, the average is then exactly symmetric:
    a flipped clip gets the clip's answer with the mirrored classes swapped."""
    import keras

    from stpkeras.models import build_model
    from tfrecords_tools.spec import PatchSpec

    labels = tuple(MOTIONS)
    perms = augment.parse_flip_labels(["h:left=right", "v:up=down", "t:left=right", "t:up=down"], labels)
    keras.utils.set_random_seed(0)
    model = build_model("stcnn", PatchSpec(*_moving_dot(1, 0, seed=0).shape[:3]), len(labels), filters=4)
    clips = np.stack([_moving_dot(*MOTIONS[name], seed=i) for i, name in enumerate(labels)])
    plain = model.predict(clips, verbose=0)

    one = augment.flip_averaged(model, {"h": perms["h"]})
    expected = (plain + model.predict(clips[:, :, :, ::-1], verbose=0)[:, perms["h"]]) / 2
    np.testing.assert_allclose(one.predict(clips, verbose=0), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - plain).max() > 1e-3   # an untrained model is not symmetric: the average differs

    every = augment.flip_averaged(model, perms)   # 8 passes: h, v, t and their combinations
    mean = every.predict(clips, verbose=0)
    for axis, perm in perms.items():
        flipped = np.flip(clips, axis=augment.FLIP_AXES[axis] + 1).copy()
        np.testing.assert_allclose(every.predict(flipped, verbose=0)[:, perm], mean, rtol=1e-4, atol=1e-5)
    hv = np.flip(clips, axis=(2, 3)).copy()
    np.testing.assert_allclose(every.predict(hv, verbose=0)[:, perms["v"]][:, perms["h"]], mean, rtol=1e-4, atol=1e-5)
    assert mean.shape == plain.shape and mean.dtype == np.float32

    # With the transposition (d) the flips no longer commute (h then d is not d then h): 16 passes, and the mean
    # is still exactly symmetric under each flip, the diagonal's too.
    dihedral = augment.parse_flip_labels(["h:left=right", "v:up=down", "t:left=right", "t:up=down", "d:left=up",
                                          "d:right=down"], labels)
    every = augment.flip_averaged(model, dihedral)
    mean = every.predict(clips, verbose=0)
    transposed = clips.transpose(0, 1, 3, 2, 4).copy()
    assert [labels[dihedral["d"][labels.index(name)]] for name in ("left", "up", "still")] == ["up", "left", "still"]
    assert [_motion_of(p) for p in transposed] == [labels[dihedral["d"][i]] for i in range(len(labels))]
    for flipped, perm in ((transposed, dihedral["d"]), (clips[:, :, :, ::-1].copy(), dihedral["h"])):
        np.testing.assert_allclose(every.predict(flipped, verbose=0)[:, perm], mean, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs square patches .* Received 8x6"):
        augment.flip_averaged(build_model("stcnn", PatchSpec(4, 8, 6), len(labels), filters=4), dihedral)


def test_label_flips_refuse_unknown_or_repeated_classes():
    with pytest.raises(ValueError, match="Expected AXIS:A=B .* Received 'h:left=sideways'"):
        augment.parse_flip_labels(["h:left=sideways"], ("left", "right"))
    with pytest.raises(ValueError, match="at most one pair per axis"):
        augment.parse_flip_labels(["h:a=b", "h:b=c"], ("a", "b", "c"))
    assert [list(p) for p in augment.parse_flip_labels(["v:up=down"], ("down", "still", "up")).values()] == [[2, 1, 0]]
    # Played backwards, both pans swap: one permutation for the time axis.
    flips = augment.parse_flip_labels(["t:left=right", "t:up=down"], ("down", "left", "right", "up"))
    assert flips == {"t": [3, 2, 1, 0]}
    with pytest.raises(ValueError, match="t \\(time"):
        augment.parse_flip_labels(["x:left=right"], ("left", "right"))
    transposition = augment.parse_flip_labels(["d:left=up", "d:right=down"], ("down", "left", "right", "up"))
    assert transposition == {"d": [2, 3, 0, 1]}
