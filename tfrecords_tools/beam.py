"""Convert stage on Apache Beam: the same per-video code, run by any Beam runner (Direct, Dataflow, Flink, Spark).

The pipeline, read top to bottom:

    items (listed by the launcher) -> Reshuffle (fan the videos out to workers)
      -> ConvertVideo: `convert.group_records` per video file (all its segments from one decode)
         -> results, one per item (main) + records (tagged)
    results -> per-split byte offset of every video (one int per video, a side input)
    records + offsets -> shard of each record -> GroupByKey (split, shard) -> WriteShard
    results + shard entries -> dataset.json (written last, by one worker)

A record goes to the shard its middle byte falls in, counted over the
split's records in (split, id) order: the rule of `shards.plan_shards`,
computed here from per-video offsets instead of one loop over every
record. The shards are therefore byte-identical to the local converter's,
with the same names `{split}-{i:05d}-of-{n:05d}.tfrecord[.gz|.zz]` and the same manifest.

What Beam gives instead of the local work folder: runners retry a failed
bundle, and a bundle's outputs count only once it succeeds, so a video
whose worker died is converted again and its records are never doubled.
Each shard is written under a unique temporary name and renamed, so a
retried or speculative write of the same shard cannot leave half a file.
A killed Beam job is started again from scratch (the runner, not this
module, owns its progress).

Needs `apache-beam` (the `beam` extra); the rest of `tfrecords_tools` does not import it.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from tfrecords_tools import manifest as mf
from tfrecords_tools import outputs
from tfrecords_tools.convert import (ConvertConfig, ConvertError, StrictFailure, build_manifest, check_pixels,
                                     disk_errors, failure_reason, finish_result, group_items, group_records,
                                     item_fields, new_result, remove_outputs)
from tfrecords_tools.shards import RECORD_OVERHEAD, copy_range, RecordSink, list_shard_files, shard_name
from tfrecords_tools.sources import Item, Source, read_source
from tfrecords_tools.storage import check_path
from tfrecords_tools.video import Plan

RECORDS = "records"
# A record on its way to a shard: ((split, video order, record index), (bytes before it in its video, bytes)).
RecordKey = Tuple[str, int, int]


class ConvertVideo(beam.DoFn):
    """One video file -> the result of each of its items (main output) and their records (output `RECORDS`).

    The items of one file (its segments) are cut from one decode. The records
    are held until the video is read to the end: a re-read (a second `Plan`)
    drops what the first read gave, which a stream already handed downstream
    could not undo.
    """

    def __init__(self, cfg: ConvertConfig):
        self.cfg = cfg

    def process(self, element: List[Tuple[int, Item, dict]]):
        orders = [order for order, _, _ in element]
        items = [item for _, item, _ in element]
        fields = [f for _, _, f in element]
        results = [dict(new_result(item, f), order=order) for order, item, f in element]
        live = [i for i, item in enumerate(items) if not item.error]
        for i, item in enumerate(items):
            if item.error:
                results[i]["reason"] = item.error
        records: Dict[int, List[bytes]] = {i: [] for i in live}
        plan: Optional[Plan] = None
        reads = 0
        start = time.perf_counter()
        if live:
            try:
                for event in group_records([items[i] for i in live], [fields[i] for i in live], self.cfg,
                                           [results[i] for i in live]):
                    if isinstance(event, Plan):
                        plan, reads, records = event, reads + 1, {i: [] for i in live}
                        continue
                    records[live[event[0]]].append(event[1])
            except Exception as e:  # noqa: BLE001  a bad video is a result, never a failed bundle
                for i in live:
                    results[i]["reason"] = failure_reason(items[i], e)
                yield from results
                return
        seconds = time.perf_counter() - start
        for i in live:
            sizes = [len(r) + RECORD_OVERHEAD for r in records[i]]
            finish_result(results[i], items[i], self.cfg, plan, reads, sizes, seconds)
            if results[i]["status"] != "ok":
                continue
            before = 0
            for n, (record, size) in enumerate(zip(records[i], sizes)):
                yield beam.pvalue.TaggedOutput(RECORDS, ((items[i].split, orders[i], n), (before, record)))
                before += size
            # Only the total travels on: the layout needs one number per video, not one per record.
            results[i]["bytes"] = before
            del results[i]["sizes"]
        yield from results


def plan_layout(results: Iterable[dict], shard_bytes: int) -> dict:
    """Per split: the shard count, the target bytes per shard, and each ok video's first byte.

    Returns {"splits": {split: (n, target)}, "offsets": {(split, order): first byte}}.
    """
    by_split: Dict[str, List[dict]] = {}
    for r in results:
        if r["status"] == "ok":
            by_split.setdefault(r["split"], []).append(r)
    layout = {"splits": {}, "offsets": {}}
    for split, videos in by_split.items():
        total = 0
        for r in sorted(videos, key=lambda r: r["order"]):  # the (split, id) order of the launcher's list
            layout["offsets"][(split, r["order"])] = total
            total += r["bytes"]
        n = max(1, math.ceil(total / max(1, shard_bytes)))
        layout["splits"][split] = (n, total / n)
    return layout


def assign_shard(element: Tuple[RecordKey, Tuple[int, bytes]], layout: dict):
    """((split, order, i), (before, record)) -> ((split, shard), (order, i, record)), as `plan_shards` cuts."""
    (split, order, i), (before, record) = element
    n, target = layout["splits"][split]
    middle = layout["offsets"][(split, order)] + before + (len(record) + RECORD_OVERHEAD) / 2
    return (split, min(n - 1, int(middle // target))), (order, i, record)


class WriteShard(beam.DoFn):
    """((split, shard), records) -> the shard file (framed, compressed, hashed) and its manifest entry."""

    def __init__(self, out: str, compression: str):
        self.out = out
        self.compression = compression

    def process(self, element, layout: dict):
        import os
        import tempfile

        import tensorflow as tf

        (split, i), values = element
        n = layout["splits"][split][0]
        name = shard_name(split, i, n, self.compression)
        records = sorted(values, key=lambda v: (v[0], v[1]))
        with tempfile.TemporaryDirectory(prefix="stp-shard-") as local:
            # TFRecordWriter frames the records (lengths and CRCs) into a local file; its bytes are then
            # compressed and hashed on the way to OUT by the local converter's own code.
            framed = os.path.join(local, "records.tfrecord")
            with tf.io.TFRecordWriter(framed) as writer:
                for _, _, record in records:
                    writer.write(record)
            # Unique per attempt: a retried or speculative bundle never writes into another's file.
            tmp = mf.join(self.out, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
            with tf.io.gfile.GFile(tmp, "wb") as f, open(framed, "rb") as src:
                sink = RecordSink(f, self.compression)
                copy_range(src, 0, os.path.getsize(framed), sink)
                sink.close()
        tf.io.gfile.rename(tmp, mf.join(self.out, name), overwrite=True)
        yield split, i, {"file": name, "records": len(records), "bytes": sink.bytes,
                         "sha256": sink.hash.hexdigest()}


def write_manifest(_, results: List[dict], entries: List[tuple], cfg: ConvertConfig, source: Source) -> dict:
    """Runs once, after every shard: checks --strict, then writes dataset.json (last, as locally)."""
    by_key = {r["key"]: r for r in results}
    if cfg.strict:
        failed = [r for r in results if r["status"] != "ok"]
        if failed:
            raise StrictFailure(f"--strict: {failed[0]['reason']}")
    shards: Dict[str, List[tuple]] = {}
    for split, i, entry in entries:
        shards.setdefault(split, []).append((i, entry))
    manifest = build_manifest(cfg, source, by_key,
                              lambda split, ok: [e for _, e in sorted(shards.get(split, []), key=lambda t: t[0])])
    manifest["runner"] = "beam"
    mf.write_manifest(cfg.out, manifest)
    return manifest


def build_pipeline(p: beam.Pipeline, cfg: ConvertConfig, source: Source) -> beam.PCollection:
    """Adds the conversion to `p`; returns the PCollection holding the one manifest."""
    items = list(source.items)
    # One element per video file: (order in the (split, id) listing, item, its record fields) of its items.
    files = [[(i, items[i], item_fields(items[i], source)) for i in group] for group in group_items(items)]
    converted = (p
                 | "Videos" >> beam.Create(files)
                 # Create is one bundle: without the reshuffle one worker would convert every video.
                 | "FanOut" >> beam.Reshuffle()
                 | "ConvertVideo" >> beam.ParDo(ConvertVideo(cfg)).with_outputs(RECORDS, main="results"))
    results = converted.results
    layout = (results
              | "AllResults" >> beam.combiners.ToList()
              | "PlanLayout" >> beam.Map(plan_layout, cfg.shard_bytes))
    entries = (converted[RECORDS]
               | "AssignShard" >> beam.Map(assign_shard, beam.pvalue.AsSingleton(layout))
               | "GroupShards" >> beam.GroupByKey()
               | "WriteShard" >> beam.ParDo(WriteShard(cfg.out, cfg.compression), beam.pvalue.AsSingleton(layout)))
    return (p
            | "Once" >> beam.Create([None])
            | "WriteManifest" >> beam.Map(write_manifest, beam.pvalue.AsList(results), beam.pvalue.AsList(entries),
                                          cfg, source))


def convert_beam(cfg: ConvertConfig, beam_options: Sequence[str] = ()) -> dict:
    """Runs the conversion as a Beam pipeline; returns the manifest (also in `OUT/dataset.json`).

    `beam_options` are Beam's own command-line flags (`--runner=DataflowRunner`,
    `--project=...`); without `--runner` Beam's DirectRunner runs in this process.
    SRC is listed here, by the launcher; the workers must reach the same video paths.
    A local OUT is held for writing (`outputs.writing`) while the pipeline runs.
    """
    check_path(cfg.out)
    outputs.check_not_input(cfg.out, [cfg.src])
    with disk_errors(cfg.out), outputs.writing(cfg.out, command=cfg.command or None):
        return _convert_beam(cfg, beam_options)


def _convert_beam(cfg: ConvertConfig, beam_options: Sequence[str]) -> dict:
    source = read_source(cfg.src, cfg.labels or None, cfg.split_fractions, cfg.values, cfg.annotations, cfg.fold)
    check_pixels(cfg, list(source.items))
    import tensorflow as tf

    if tf.io.gfile.exists(mf.manifest_path(cfg.out)) and not cfg.overwrite:
        try:
            existing = mf.read_manifest(cfg.out)
        except mf.ManifestError:
            existing = None
        if existing is not None and existing.get("fingerprint") != cfg.fingerprint():
            raise ConvertError(f"{cfg.out} holds a conversion with other settings. "
                               "Use another OUT or --overwrite to replace it.")
    # Shards of an earlier run with another layout would be read as data: remove them first.
    remove_outputs(cfg.out)
    tf.io.gfile.makedirs(cfg.out)
    started = time.perf_counter()
    options = PipelineOptions(list(beam_options))
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, cfg, source)
    manifest = mf.read_manifest(cfg.out)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    # Temporary shard names of failed attempts (the runner retried them under other names).
    for name in list_shard_files(cfg.out):
        if name.endswith(".tmp"):
            tf.io.gfile.remove(mf.join(cfg.out, name))
    mf.write_manifest(cfg.out, manifest)
    return manifest


def beam_options(pairs: Sequence[str]) -> List[str]:
    """['runner=DataflowRunner', 'project=p'] -> ['--runner=DataflowRunner', '--project=p'] (KEY=VALUE checked)."""
    out = []
    for text in pairs:
        key, sep, value = text.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"Invalid value for argument `beam_option`. Expected KEY=VALUE (e.g. "
                             f"runner=DataflowRunner). Received {text!r}")
        out.append(f"--{key}={value}" if sep else f"--{key}")
    return out
