"""Retrieval: recall@k by hand, exact (TF) vs faiss vs numpy search, the index folder, pooled features, CLI."""

import json
import os

import numpy as np
import pytest

from stpkeras import index as ix
from tfrecords_tools.spec import PatchSpec


def test_recall_at_k_hand_computed():
    # q0: first result relevant; q1: relevant at rank 3; q2: never; q3: relevant at rank 5.
    queries = ["a", "b", "a", "c"]
    retrieved = [["a", "b", "c", "b", "b"],
                 ["a", "c", "b", "a", "a"],
                 ["b", "b", "c", "c", "b"],
                 ["a", "a", "b", "b", "c"]]
    got = ix.recall_at_k(queries, retrieved, ks=(1, 3, 5))
    assert got == {"recall@1": 0.25, "recall@3": 0.5, "recall@5": 0.75}
    with pytest.raises(ValueError, match="2 query labels for 1 result lists"):
        ix.recall_at_k(["a", "b"], [["a"]])
    # mAP over whole rankings: q0 "a" relevant at rank 1 -> AP 1; q1 "b" at rank 3 -> 1/3;
    # q2 "a": none -> no AP; q3 "c" at rank 5 -> 1/5.
    ranked = [["a", "b", "c", "b", "b"], ["a", "c", "b", "a", "a"], ["b", "b", "c", "c", "b"],
              ["a", "a", "b", "b", "c"]]
    assert ix.mean_average_precision(queries, ranked) == pytest.approx((1 + 1 / 3 + 1 / 5) / 3)
    # Two relevant items at ranks 1 and 4: (1/1 + 2/4) / 2.
    assert ix.mean_average_precision(["a"], [["a", "b", "c", "a"]]) == pytest.approx(0.75)


def test_exact_tf_and_faiss_search_agree_with_numpy():
    rng = np.random.default_rng(0)
    vectors = ix._normalize(rng.normal(size=(500, 16)))
    queries = ix._normalize(vectors[:20] + 0.05 * rng.normal(size=(20, 16)))
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]
    scores, indices = ix.ExactSearch(vectors, block=7).search(queries, 5)
    np.testing.assert_array_equal(indices, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, truth, axis=1), atol=1e-5)
    assert indices[:, 0].tolist() == list(range(20))  # each noisy copy finds its source
    pytest.importorskip("faiss", reason="the `ann` extra (faiss-cpu) is not installed")
    scores_ann, indices_ann = ix.FaissSearch.build(vectors).search(queries, 5)
    # HNSW is approximate; on 500 vectors with a wide beam it returns the exact top 5.
    np.testing.assert_array_equal(indices_ann, truth)
    np.testing.assert_allclose(scores_ann, scores, atol=1e-5)
    # k larger than the collection: every vector, once.
    _, all_of_them = ix.ExactSearch(vectors[:3]).search(queries[:1], 10)
    assert sorted(all_of_them[0].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_index_centres_saves_loads_and_searches(tmp_path, backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="the `ann` extra (faiss-cpu) is not installed")
    rng = np.random.default_rng(1)
    # Raw features all share a large positive offset (ReLU features do): raw cosines all near 1.
    raw = 5.0 + rng.normal(size=(6, 8)).astype(np.float32)
    embedded = ix.Embedded(ids=tuple(f"v{i}.mp4" for i in range(6)), vectors=raw, labels=("a", "a", "b", "b", "c", "c"))
    index = ix.VideoIndex.build(embedded, model="m", spec=PatchSpec(4, 8, 8), backend=backend)
    np.testing.assert_allclose(index.center, raw.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-6)
    index.save(str(tmp_path / "idx"))
    assert sorted(os.listdir(tmp_path / "idx")) == sorted(
        ["index.json", "embeddings.npy", "center.npy"] + (["faiss.index"] if backend == "faiss" else []))
    loaded = ix.VideoIndex.load(str(tmp_path / "idx"))
    assert loaded.ids == index.ids and loaded.labels == index.labels and loaded.spec == PatchSpec(4, 8, 8)
    hits = loaded.search(raw[[3]] + 0.01, k=3)[0]
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].video == "v3.mp4" and hits[0].label == "b" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].score >= hits[1].score >= hits[2].score
    # Centred, the other videos no longer all score near 1.
    assert hits[1].score < 0.9
    queries = ix.Embedded(ids=("q0", "q1"), vectors=raw[[0, 4]] + 0.01, labels=("a", "b"))
    got = ix.evaluate_retrieval(loaded, queries, ks=(1, 2))
    assert {k: v for k, v in got.items() if k != "map"} == {
        "recall@1": 0.5, "recall@2": 0.5, "queries": 2, "gallery": 6}
    assert 0.0 < got["map"] <= 1.0


def test_load_refuses_what_is_not_an_index(tmp_path):
    with pytest.raises(ix.RetrievalError, match="not an index written by `stp index`"):
        ix.VideoIndex.load(str(tmp_path))


def test_pooled_features_of_stcnn_average_its_pooled_map_and_keep_its_outputs():
    import keras

    from stpkeras.embedding import feature_model
    from stpkeras.models import build_model

    spec = PatchSpec(4, 16, 16)
    model = build_model("stcnn", spec, 3, filters=6)
    x = np.random.default_rng(0).integers(0, 256, (2, *spec.shape), dtype=np.uint8)
    features = feature_model(model)
    assert features.output_shape == (None, 6)
    pooled_map = keras.Model(model.input, model.get_layer("pool").output)(x)
    np.testing.assert_allclose(features(x), np.mean(pooled_map, axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    assert model.output_shape == (None, 3)  # the classifier itself is unchanged
    c3d = build_model("c3d", spec, 3, widths=(4, 8), convs_per_stage=(1, 1))
    np.testing.assert_allclose(feature_model(c3d)(x), keras.Model(c3d.input, c3d.get_layer("features").output)(x))


# --- end to end on the sample videos ---------------------------------------------------------------

SAMPLES = ("bikes.mp4", "bigbuckbunny.mp4", "tree.avi", "Megamind_bugy.avi")
NEAR_DUP_SPEC = PatchSpec(8, 32, 32, short_side=48)


def _decoded(path):
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _even(n):
    return max(2, n - n % 2)


def _copies(frames, out_dir, stem):
    """Re-encoded (crf 35), resized (half), cropped (6% off every side) and trimmed (middle 70%) copies."""
    from PIL import Image

    from tfrecords_tools.video import VideoWriter

    t, h, w, _ = frames.shape
    dy, dx = h * 6 // 100, w * 6 // 100
    versions = {
        "reencoded": (frames, 35),
        "resized": (np.stack([np.asarray(Image.fromarray(f).resize((_even(w // 2), _even(h // 2)), Image.BILINEAR))
                              for f in frames]), 23),
        "cropped": (frames[:, dy:dy + _even(h - 2 * dy), dx:dx + _even(w - 2 * dx)], 23),
        "trimmed": (frames[int(0.15 * t):int(0.85 * t)], 23),
    }
    paths = {}
    for name, (clip, crf) in versions.items():
        paths[name] = os.path.join(out_dir, f"{stem}_{name}.mp4")
        with VideoWriter(paths[name], 25.0, crf=crf, options={"preset": "ultrafast"}) as writer:
            for frame in clip:
                writer.write(np.ascontiguousarray(frame))
    return paths


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory, sample):
    """`stp train --task embed` (self-supervised, no labels) on the four sample videos: the run folder."""
    from tfrecords_tools.convert import ConvertConfig, convert
    from stpkeras.train import TrainConfig, train

    root = tmp_path_factory.mktemp("embed")
    src = root / "src"
    src.mkdir()
    for name in SAMPLES:
        os.symlink(sample(name), src / name)
    manifest = convert(ConvertConfig(src=str(src), out=str(root / "data"), spec=NEAR_DUP_SPEC, workers=2))
    assert manifest["counts"]["ok"] == 4
    run = train(TrainConfig(data=str(root / "data"), out=str(root / "run"), task="embed", model="stcnn",
                            model_options=(("filters", 16),), epochs=3, batch_size=32, lr=3e-3,
                            augment=("crop", "color"), seed=0, verbose=0), echo=lambda s: None)
    assert run["task"] == "embed" and run["metrics"]["epochs"] == 3
    # The contrastive task learns: its loss falls from the first epoch to the last.
    from stpkeras.train import read_history
    losses = read_history(str(root / "run"))["loss"]
    assert losses[-1] < losses[0], losses
    return str(root / "run"), src


def test_near_duplicates_of_the_sample_videos_find_their_source_at_rank_1(embed_run, tmp_path, cli):
    run_dir, src = embed_run
    index_dir = tmp_path / "index"
    result = cli("index", run_dir, *[src / n for n in SAMPLES], "--out", index_dir)
    assert result.exit_code == 0, result.output
    assert "indexed 4 videos" in result.output
    info = json.loads((index_dir / "index.json").read_text())
    assert info["count"] == 4 and info["dim"] == 16 and info["failed"] == []
    queries, sources = [], []
    for name in SAMPLES:
        for path in _copies(_decoded(str(src / name)), str(tmp_path), os.path.splitext(name)[0]).values():
            queries.append(path)
            sources.append(str(src / name))
    result = cli("search", index_dir, *queries, "-k", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 2 * len(queries)
    top = {r["query"]: r for r in rows if r["rank"] == 1}
    second = {r["query"]: r for r in rows if r["rank"] == 2}
    for query, source in zip(queries, sources):
        assert os.path.abspath(top[query]["video"]) == os.path.abspath(source), (query, top[query], second[query])
        assert top[query]["score"] > second[query]["score"]
    assert info["aggregate"] == "windows"
    # One vector a video (--aggregate mean): no windows kept; the trimmed copies still find their source.
    result = cli("index", run_dir, *[src / n for n in SAMPLES], "--out", tmp_path / "mean", "--aggregate", "mean")
    assert result.exit_code == 0, result.output
    written = sorted(f for f in os.listdir(tmp_path / "mean") if not f.startswith("."))   # not the write lock
    assert written == ["center.npy", "embeddings.npy", "index.json"]
    trimmed = [q for q in queries if q.endswith("_trimmed.mp4")]
    result = cli("search", tmp_path / "mean", *trimmed, "-k", "1", "--json")
    assert result.exit_code == 0, result.output
    found = {r["query"]: os.path.abspath(r["video"]) for r in map(json.loads, result.output.splitlines())}
    assert found == {q: os.path.abspath(s) for q, s in zip(queries, sources) if q in trimmed}
    # --pool grid:2: 2x2 cells of 16 features; recorded, and `stp search` pools the queries the same way.
    result = cli("index", run_dir, *[src / n for n in SAMPLES], "--out", tmp_path / "grid", "--pool", "grid:2")
    assert result.exit_code == 0, result.output
    grid_info = json.loads((tmp_path / "grid" / "index.json").read_text())
    assert grid_info["pool"] == "grid:2" and grid_info["dim"] == 64 and info["pool"] == "mean"
    result = cli("search", tmp_path / "grid", *queries, "-k", "1", "--json")
    assert result.exit_code == 0, result.output
    found = {r["query"]: os.path.abspath(r["video"]) for r in map(json.loads, result.output.splitlines())}
    assert found == {q: os.path.abspath(s) for q, s in zip(queries, sources)}
    # For copies: every video read inside its black bars and indexed as two views (8 entries, each video
    # answered once), the first two results re-ranked by the detail of aligned frames.
    result = cli("index", run_dir, *[src / n for n in SAMPLES], "--out", tmp_path / "copies", "--pool", "grid:2",
                 "--strip-bars", "--views", "1,0.85")
    assert result.exit_code == 0 and "indexed 4 videos" in result.output, result.output
    copy_info = json.loads((tmp_path / "copies" / "index.json").read_text())
    assert copy_info["reading"] == {"strip_bars": True, "views": [1.0, 0.85]} and copy_info["count"] == 8
    cropped = [q for q in queries if q.endswith("_cropped.mp4")]
    result = cli("search", tmp_path / "copies", *cropped, "-k", "3", "--json", "--rerank", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 3 * len(cropped) and len({(r["query"], r["video"]) for r in rows}) == len(rows)
    for query, source in zip(queries, sources):
        if query in cropped:
            got = [r for r in rows if r["query"] == query]
            assert os.path.abspath(got[0]["video"]) == os.path.abspath(source), got
            assert got[0]["matched"] > got[1]["matched"] + 0.1 and "matched" not in got[2], got
    result = cli("index", run_dir, src / SAMPLES[0], "--out", tmp_path / "bad", "--pool", "grid:0")
    assert result.exit_code == 2 and "Expected 'mean' or 'grid:N'" in result.output and "grid:0" in result.output


# --- windows: a query scored by its windows' best matches ------------------------------------------

def test_chamfer_scores_hand_computed():
    # Video 0 has windows (1, 0) and (0, 1); video 1 has (0.6, 0.8); video 2 has (-1, 0), (0, -1), (0.8, 0.6).
    windows = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0], [0, -1], [0.8, 0.6]], np.float32)
    offsets = np.array([0, 2, 3, 6])
    query = np.array([[1, 0], [0, 1]], np.float32)
    # Video 0: each query window finds itself: (1 + 1) / 2. Video 1: (0.6 + 0.8) / 2. Video 2: (0.8 + 0.6) / 2.
    expected = [1.0, 0.7, 0.7]
    np.testing.assert_allclose(ix.chamfer_scores(query, windows, offsets), expected, atol=1e-6)
    # Blocks smaller than a video still take whole videos, and give the same scores.
    np.testing.assert_allclose(ix.chamfer_scores(query, windows, offsets, block=1), expected, atol=1e-6)
    np.testing.assert_allclose(ix.chamfer_scores(query[:1], windows, offsets, block=3), [1.0, 0.6, 0.8], atol=1e-6)


def test_windows_index_saves_loads_and_old_indexes_keep_the_mean(tmp_path):
    rng = np.random.default_rng(2)
    windows = tuple(rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 1, 4))
    embedded = ix.Embedded(ids=("a.mp4", "b.mp4", "c.mp4"), vectors=np.stack([w.mean(axis=0) for w in windows]),
                           windows=windows)
    index = ix.VideoIndex.build(embedded)
    assert index.aggregate == "windows" and index.offsets.tolist() == [0, 3, 4, 8]
    np.testing.assert_allclose(np.linalg.norm(index.windows, axis=1), 1.0, atol=1e-6)
    # A query made of video c's windows 1 and 2 (a trimmed copy) scores 1.0 against c.
    hits = index.search_windows([windows[2][1:3]], k=3)[0]
    assert hits[0].video == "c.mp4" and hits[0].score == pytest.approx(1.0, abs=1e-6) and len(hits) == 3
    index.save(str(tmp_path / "idx"))
    loaded = ix.VideoIndex.load(str(tmp_path / "idx"))
    assert loaded.aggregate == "windows"
    np.testing.assert_array_equal(loaded.windows, index.windows)
    assert [h.video for h in loaded.search_windows([windows[2][1:3]], k=3)[0]] == [h.video for h in hits]
    # An index written before windows existed: no `aggregate` in index.json, no windows files. It still
    # loads and scores a query by the mean of its windows, as before.
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    del info["aggregate"]
    (tmp_path / "idx" / "index.json").write_text(json.dumps(info))
    for name in ("windows.npy", "window_offsets.npy"):
        os.remove(tmp_path / "idx" / name)
    old = ix.VideoIndex.load(str(tmp_path / "idx"))
    assert old.aggregate == "mean" and old.windows is None
    by_mean = old.search(windows[0].mean(axis=0)[None], k=3)[0]
    assert [h.video for h in old.search_windows([windows[0]], k=3)[0]] == [h.video for h in by_mean]
    assert by_mean[0].video == "a.mp4"
    # index.json saying windows with the files gone: one clear error naming the folder.
    info["aggregate"] = "windows"
    (tmp_path / "idx" / "index.json").write_text(json.dumps(info))
    with pytest.raises(ix.RetrievalError, match="aggregate 'windows' but the windows cannot be read.*stp index"):
        ix.VideoIndex.load(str(tmp_path / "idx"))
    with pytest.raises(ValueError, match="Expected one of .*Received aggregate='max'"):
        ix.VideoIndex.build(embedded, aggregate="max")


def test_a_trimmed_copy_finds_its_source_by_windows(sample, tmp_path):
    """bikes.mp4 cut in two adjacent segments; the query is the last third of the first, re-encoded at
    crf 35 at half size: its mean sits between the two segments (it is what comes just before the
    second), its windows match the first's."""
    from PIL import Image

    from tfrecords_tools.video import VideoWriter

    frames = _decoded(sample("bikes.mp4"))[:192]
    clips = {"a": frames[:96], "b": frames[96:], "query": frames[64:96]}
    paths = {}
    for name, clip in clips.items():
        paths[name] = str(tmp_path / f"{name}.mp4")
        crf = 35 if name == "query" else 18
        with VideoWriter(paths[name], 25.0, crf=crf, options={"preset": "ultrafast"}) as writer:
            for frame in clip:
                if name == "query":
                    frame = np.asarray(Image.fromarray(frame).resize((320, 136), Image.BILINEAR))
                writer.write(np.ascontiguousarray(frame))
    embedder = ix.thumbnail_embedder(PatchSpec(8, 16, 16, resize=(16, 16)), 4)
    embedded = ix.embed_videos(embedder, [paths["a"], paths["b"]])
    assert [len(w) for w in embedded.windows] == [12, 12] and embedded.patches == (12, 12)
    query = ix.embed_video_windows(embedder, paths["query"])
    assert len(query.windows) == 4
    by_windows = ix.VideoIndex.build(embedded, aggregate="windows").search_windows([query.windows], k=2)[0]
    by_mean = ix.VideoIndex.build(embedded, aggregate="mean").search_windows([query.windows], k=2)[0]
    assert [h.video for h in by_windows] == [paths["a"], paths["b"]]
    assert by_windows[0].score > 0.9 and by_windows[0].score - by_windows[1].score > 0.1
    # By the mean the copy sits almost halfway (measured: +0.067 against -0.067); its windows match a's (0.999).
    assert by_mean[0].score - by_mean[1].score < 0.5 * (by_windows[0].score - by_windows[1].score)
