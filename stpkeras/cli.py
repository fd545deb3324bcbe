"""CLI stage: the `stp` click group. Each command parses, builds a config, calls one library function
and prints a short summary. TensorFlow loads inside the commands, so `stp --help` is instant.

Errors are caught once, at the group's edge (`_Group.invoke`): a library error (`StpError`) or an
argument value the library refused (`ValueError`) becomes one `Error: ...` line on stderr and the exit
code of its kind; click's own usage errors are click's. Exit codes (`tfrecords_tools.errors`, the
README's table):
  0  everything succeeded
  1  the command ran but some inputs failed (e.g. videos that could not be converted; see the manifest),
     or --strict stopped at the first of them
  2  bad usage or bad input to the command itself (click's convention): a model that is not one, a
     split DATA lacks, a run folder that exists without --resume, an output path that is one of the
     command's inputs (same path, symbolic or hard link): refused before any work
  3  corrupt or inconsistent data: a folder without a manifest or with a broken one, `stp verify`'s
     findings, records that fail to read in any command
  4  not now: another process is writing the folder (or reading it, for a command that writes it; it is
     named), no space left or no permission to write, a server that does not answer. Nothing half-done
     is left; the same command may succeed later.
"""

from __future__ import annotations

import os
import sys

import click

from stpkeras import __version__
from tfrecords_tools.errors import EXIT_DATA, EXIT_OK, EXIT_PARTIAL, exit_code_of
from tfrecords_tools.pixels import DEFAULT as DEFAULT_PIXELS, PIXEL_FORMATS
from tfrecords_tools.spec import parse_pair, parse_triple


class _Group(click.Group):
    """The one place errors are caught: a library error becomes one `Error: ...` line and its exit code.

    Anything `tfrecords_tools.errors.exit_code_of` does not know is a bug: it keeps its traceback.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001  re-raised unless it is one of ours
            code = exit_code_of(e)
            if code is None:
                raise
            error = click.ClickException(str(e))
            error.exit_code = code
            raise error from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="stp")
def main():
    """stpkeras: videos -> spacetime patches (TFRecords) -> Keras Conv3D models -> TF Serving."""
    # TensorFlow's C++ start-up chatter (CPU features, missing CUDA) buries the command's own output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --- commands are added below, one block per stage -------------------------------------------

# --- convert / inspect / verify / preview (videos -> TFRecords) ---------------------------------


def _sizes(parse):
    """A click callback that parses 'TxHxW' / 'HxW' with `parse` and reports a bad value as click does."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value, param.name)
        except ValueError as e:
            raise click.BadParameter(str(e)) from e
    return callback


_triple = _sizes(parse_triple)
_pair = _sizes(parse_pair)


def _fractions(ctx, param, value):
    out = []
    for text in value:
        name, _, frac = text.partition("=")
        try:
            f = float(frac)
        except ValueError:
            f = -1.0
        if not name or not 0.0 < f < 1.0:
            raise click.BadParameter(f"expected SPLIT=FRACTION with 0 < FRACTION < 1, e.g. val=0.2; received {text!r}")
        out.append((name, f))
    if sum(f for _, f in out) >= 1.0:
        raise click.BadParameter("the fractions must add up to less than 1 (the rest stays in train)")
    return tuple(out)


class _ProgressLine:
    """One self-rewriting status line on a terminal; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shown = False

    def __call__(self, progress, result):
        import time
        if result.get("status") != "ok":
            click.echo(f"warning: {result['status']}: {result['reason']}", err=True)
        if not self.enabled:
            return
        elapsed = max(1e-6, time.perf_counter() - progress.started)
        width = 24
        filled = int(width * progress.done / max(1, progress.total))
        line = (f"\r[{'#' * filled}{'.' * (width - filled)}] videos {progress.done}/{progress.total}"
                f" ({progress.failed} failed) | patches {progress.patches:,}"
                f" | {progress.frames / elapsed:,.0f} frames/s")
        click.echo(line, nl=False, err=True)
        self.shown = True

    def close(self):
        if self.shown:
            click.echo("", err=True)


def _checked_by(module: str, function: str):
    """A click callback that passes the value to `module.function` (imported when the option is parsed, so
    `stp` starts without TensorFlow), turns its ValueError into click's usage error, and keeps the value."""

    def callback(ctx, param, value):
        import importlib

        try:
            getattr(importlib.import_module(module), function)(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from e
        return value

    return callback


def _pairs_option(ctx, param, value):
    """`--pairs CODEC:CRFS` -> its canonical string (`tfrecords_tools.codec`), checked."""
    if not value:
        return None
    from tfrecords_tools.codec import parse_pairs
    try:
        return str(parse_pairs(value))
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e


@main.command()
@click.argument("src", type=click.Path(exists=True, readable=True))
@click.argument("out", type=click.Path(file_okay=False, writable=True))
@click.option("--patch", default="8x64x64", show_default=True, metavar="TxHxW", callback=_triple,
              help="Patch size: frames x height x width.")
@click.option("--stride", default=None, metavar="TxHxW", callback=_triple,
              help="Grid step (default: the patch size, i.e. non-overlapping).")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True, max=1000), default=None,
              help="Resample to this frame rate by frame timestamps (default: keep every decoded frame).")
@click.option("--resize", default=None, metavar="HxW", callback=_pair, help="Resize every frame to HxW.")
@click.option("--short-side", type=click.IntRange(min=1), default=None, metavar="N",
              help="Resize so the shorter side is N pixels, keeping the aspect ratio.")
@click.option("--pad", type=click.Choice(["drop", "edge", "zero"]), default="drop", show_default=True,
              help="What to do with a tail that does not fill a whole patch.")
@click.option("--pixels", type=click.Choice(list(PIXEL_FORMATS)), default=DEFAULT_PIXELS.name, show_default=True,
              help="How patches are stored and fed to models: rgb (3 bytes a pixel), or yuv440 (luma + chroma of "
                   "pairs of rows, 2 bytes a pixel, raw only; the model converts to RGB in its first layer: faster "
                   "to stream, for classification and retrieval).")
@click.option("--encoding", type=click.Choice(["raw", "jpeg", "png"]), default="raw", show_default=True,
              help="How pixels are stored: raw uint8 bytes, or one JPEG/PNG per frame.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--compression", type=click.Choice(["none", "gzip", "zlib"]), default="none", show_default=True,
              help="TFRecord file compression.")
@click.option("--shard-size", type=click.FloatRange(min=0, min_open=True), default=256.0, show_default=True,
              metavar="MB", help="Target shard size in MB.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, envvar="STP_WORKERS",
              help="Worker processes (one video each at a time).")
@click.option("--decode-threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="FFmpeg threads per worker.")
@click.option("--labels", default=None, metavar="A,B,...",
              help="The class names, in index order; a label not in the list is an error "
                   "(default: all labels found, sorted).")
@click.option("--split-fraction", "split_fraction", multiple=True, callback=_fractions, metavar="SPLIT=F",
              help="Move a share of the train videos to another split, by a hash of their path (repeatable), "
                   "e.g. val=0.2.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=7680 * 4320, show_default=True,
              help="Refuse videos whose declared frame has more pixels (decompression-bomb guard).")
@click.option("--clips-per-video", type=click.IntRange(min=1), default=None, metavar="N",
              help="Per video (per segment when the source has segments): N evenly spaced clips of the patch "
                   "length instead of the whole temporal grid.")
@click.option("--max-patches-per-video", type=click.IntRange(min=1), default=None, metavar="N",
              help="Per video (or segment): keep at most N patches, evenly spread.")
@click.option("--values", default=None, metavar="COL,...",
              help="CSV columns of numbers to store per item (value/data; default: the `value` column, if any).")
@click.option("--annotations", default=None, metavar="FORMAT:PATH",
              help="SRC is a folder of videos described by a standard dataset's annotation files: "
                   "kinetics:CSV_OR_FOLDER, ucf101:ucfTrainTestlist, hmdb51:SPLITS_FOLDER, ssv2:LABELS_FOLDER, "
                   "charades:FOLDER (see docs/conversion.md).")
@click.option("--fold", type=click.IntRange(1, 3), default=1, show_default=True,
              help="The split fold of --annotations ucf101 or hmdb51.")
@click.option("--pairs", default=None, metavar="CODEC:CRFS", callback=_pairs_option,
              help="Make compressed/clean pairs of every (clean) video for --task enhance: h264:23-40 (4 crf levels "
                   "evenly spaced), h264:30,37 or h264:37; each copy encoded with libx264 as converted (after resize "
                   "and frame rate), its target the lossless original. h264:auto: each H.264 video's own level (its "
                   "quantizer against a trial encode) to 2 above, for compressed footage paired with its own "
                   "re-encodings.")
@click.option("--overwrite", is_flag=True, help="Replace an OUT written with other settings.")
@click.option("--strict", is_flag=True, help="Stop at the first video that fails (exit 1, no manifest).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Local folder for per-video chunks (default OUT/.stp-work; required when OUT is gs:// or s3://).")
@click.option("--runner", type=click.Choice(["local", "beam"]), default="local", show_default=True,
              help="local: worker processes on this machine; beam: an Apache Beam pipeline "
                   "(pip install 'stpkeras[beam]'), DirectRunner unless --beam-option runner=... says otherwise.")
@click.option("--beam-option", "beam_option", multiple=True, metavar="KEY=VALUE",
              help="A Beam pipeline option, repeatable, e.g. runner=DataflowRunner, project=P, region=R, "
                   "temp_location=gs://B/tmp (see the README).")
def convert(src, out, patch, stride, fps, resize, short_side, pad, pixels, encoding, quality, compression, shard_size,
            workers, decode_threads, labels, split_fraction, max_pixels, clips_per_video, max_patches_per_video, values,
            annotations, fold, pairs, overwrite, strict, quiet, work_dir, runner, beam_option):
    """Convert videos (a folder of class folders, a flat folder, a CSV, or a folder of videos with
    --annotations) into TFRecords of patches.

    OUT may be a local folder or a gs:// (s3:// with tensorflow-io) URL.
    """
    from tfrecords_tools.convert import ConvertConfig
    from tfrecords_tools.convert import convert as run_convert
    from tfrecords_tools.spec import PatchSpec

    if beam_option and runner != "beam":
        raise click.BadParameter("needs --runner beam", param_hint="--beam-option")
    if pairs and runner == "beam":
        raise click.BadParameter("makes its copies on this machine: use --runner local", param_hint="--pairs")

    spec = PatchSpec(*patch, stride_frames=stride[0] if stride else None,
                     stride_height=stride[1] if stride else None, stride_width=stride[2] if stride else None,
                     pad=pad, fps=fps, resize=resize, short_side=short_side, pixels=pixels)
    cfg = ConvertConfig(src=src, out=out, spec=spec, encoding=encoding, quality=quality,
                        compression=compression, shard_size_mb=shard_size, max_pixels=max_pixels,
                        labels=tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else (),
                        split_fractions=split_fraction, workers=workers, decode_threads=decode_threads,
                        overwrite=overwrite, strict=strict, command=" ".join(["stp"] + sys.argv[1:]),
                        work_dir=work_dir, clips_per_video=clips_per_video or 0,
                        max_patches_per_video=max_patches_per_video or 0,
                        values=tuple(x.strip() for x in values.split(",") if x.strip()) if values else (),
                        annotations=annotations or "", fold=fold, pairs=pairs or "")
    if runner == "beam":
        try:
            from tfrecords_tools.beam import beam_options, convert_beam
        except ImportError as e:
            raise click.UsageError(f"--runner beam needs Apache Beam: pip install 'stpkeras[beam]' ({e})") from e
        manifest = convert_beam(cfg, beam_options(beam_option))
        if not quiet:
            for v in manifest["videos"]:
                if v["status"] != "ok":
                    click.echo(f"warning: {v['status']}: {v['reason']}", err=True)
    else:
        bar = _ProgressLine(enabled=not quiet and sys.stderr.isatty())
        try:
            manifest = run_convert(cfg, on_progress=bar)
        finally:
            bar.close()
    counts = manifest["counts"]
    for warning in manifest.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if not quiet:
        if manifest.get("up_to_date"):
            click.echo(f"{out}: already converted with these settings (use --overwrite to redo).")
        splits = ", ".join(f"{k} {v['records']:,} patches in {len(v['shards'])} shard(s)"
                           for k, v in manifest["splits"].items())
        click.echo(f"converted {counts['ok']}/{counts['videos']} videos -> {out}: {splits}")
        if counts["failed"] or counts["skipped"]:
            click.echo(f"{counts['failed']} failed, {counts['skipped']} skipped: see `stp inspect {out}`", err=True)
    sys.exit(EXIT_PARTIAL if counts["failed"] or counts["skipped"] else EXIT_OK)


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(data, as_json):
    """Describe a converted folder: spec, splits, labels, sizes, failures."""
    import json as _json

    from tfrecords_tools.manifest import read_manifest
    from tfrecords_tools.spec import PatchSpec

    m = read_manifest(data)
    if as_json:
        click.echo(_json.dumps(m, indent=1))
        return
    spec = PatchSpec.from_dict(m["spec"])
    c = m["counts"]
    total_bytes = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"])
    click.echo(f"{data}: {c['patches']:,} patches of uint8 {list(spec.shape)} from {c['ok']}/{c['videos']} videos "
               f"({c['failed']} failed, {c['skipped']} skipped)")
    click.echo(f"  spec: {spec.describe()}")
    click.echo(f"  storage: {m['encoding']}" + (f" (quality {m['quality']})" if m["encoding"] == "jpeg" else "")
               + f", compression {m['compression']}, {total_bytes / 1e6:,.1f} MB"
               + (f", {total_bytes / max(1, c['patches']) / 1e3:,.1f} kB/patch" if c["patches"] else ""))
    click.echo(f"  labels: {', '.join(m['labels']) if m['labels'] else '(unlabelled)'}")
    for name, sp in m["splits"].items():
        click.echo(f"  split {name}: {sp['records']:,} patches, {sp['videos']} videos, {len(sp['shards'])} shard(s)")
        if sp.get("label_counts"):
            most = max(sp["label_counts"].values())
            for label, n in sp["label_counts"].items():
                click.echo(f"    {label:>16} {n:>8,} {'#' * max(1, round(30 * n / most))}")
    for warning in m.get("warnings", []):
        click.echo(f"  warning: {warning}")
    bad = [v for v in m["videos"] if v["status"] != "ok"]
    if bad:
        click.echo(f"  problems ({len(bad)}):")
        for v in bad:
            click.echo(f"    {v['status']}: {v['reason']}")
    click.echo(f"  made by: {m.get('command', '?')} on {m.get('created', '?')} "
               f"(stpkeras {m.get('versions', {}).get('stpkeras', '?')}, "
               f"TF {m.get('versions', {}).get('tensorflow', '?')})")


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
def verify(data):
    """Read every record of every shard; check CRCs, sha256, counts and shapes (exit 3 on any problem)."""
    from tfrecords_tools.verify import verify as run_verify

    report = run_verify(data)
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    click.echo(f"{data}: {report.shards} shards, {report.records:,} records read, "
               f"{len(report.problems)} problem(s)")
    sys.exit(EXIT_OK if report.ok else EXIT_DATA)


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_png", type=click.Path(dir_okay=False), default="preview.png", show_default=True,
              help="The PNG to write.")
@click.option("--count", type=click.IntRange(1, 64), default=8, show_default=True, help="Patches to show (rows).")
@click.option("--split", default=None, help="Split to sample from (default: the first).")
@click.option("--scale", type=click.IntRange(1, 8), default=2, show_default=True, help="Pixel magnification.")
def preview(data, out_png, count, split, scale):
    """Write a PNG of sample patches (one row per patch, its frames side by side)."""
    from stpkeras.preview import write_preview

    rows = write_preview(data, out_png, count=count, split=split, scale=scale)
    click.echo(f"wrote {out_png}: {len(rows)} patches")
    for r in rows:
        click.echo(f"  {r}")


@main.command()
@click.option("--out", default="stp-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the demo makes.")
@click.option("--per-class", type=click.IntRange(2, 1000), default=24, show_default=True,
              help="Generated videos per class.")
@click.option("--epochs", type=click.IntRange(1, 1000), default=None, help="Training epochs (default: the demo's).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Conversion workers.")
@click.option("--pixels", type=click.Choice(list(PIXEL_FORMATS)), default=DEFAULT_PIXELS.name, show_default=True,
              help="Pixel format of the records (see `stp convert --pixels`).")
def demo(out, per_class, epochs, workers, pixels):
    """Run the whole job on built-in generated videos: make, convert, train, evaluate, export, predict."""
    from stpkeras.demo import run_demo

    sys.exit(run_demo(out, per_class=per_class, epochs=epochs, workers=workers, pixels=pixels, echo=click.echo))



# --- export / serving-config / predict (run folder -> SavedModel -> labels) --------------------


def _labels_option(ctx, param, value):
    """`--labels`: a text file with one class name a line, or names separated by commas."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    return tuple(v.strip() for v in value.split(",") if v.strip())


# `stp evaluate`, `stp predict` and `stp export` (`artifacts.flip_averaged`).
_tta_option = click.option(
    "--tta", is_flag=True,
    help="Test-time augmentation: average each patch's logits over the flips the run trained with "
         "(--flip-labels; 2^k passes for k flipped axes), each mapped back to the clip's own classes; "
         "an enhancer's pixels over the left-right, top-bottom and time flips (8 passes).")
_tta_flip_labels_option = click.option(
    "--tta-flip-labels", multiple=True, metavar="AXIS:A=B",
    help="A classifier's --tta also over this flip (as --flip-labels: h, v, t or d, and the two classes it swaps), "
         "besides the run's own; repeatable, implies --tta. E.g. time reversal for camera motion: "
         "t:left=right and t:up=down.")


@main.command("export")
@click.argument("model", metavar="RUN_DIR_OR_MODEL", type=click.Path(exists=True))
@click.option("--name", required=True, metavar="NAME",
              help="Model name: the folder under --out and TF Serving's model name.")
@click.option("--out", "out_root", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Root of the SavedModels (TF Serving's model base paths live under it).")
@click.option("--version", "version", type=click.IntRange(min=1), default=None, metavar="N",
              help="Version folder to write (default: the next free integer). An existing one is never replaced.")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None, metavar="DATASET",
              help="A converted folder whose dataset.json gives the labels and PatchSpec (for a .keras file "
                   "outside its run folder).")
@click.option("--labels", default=None, metavar="FILE|A,B,...", callback=_labels_option,
              help="Class names (a file, one a line, or a comma list); overrides the run's.")
@click.option("--streaming", is_flag=True,
              help="Also export `stream` (new frames + state -> an answer per frame + new state) and `init_state`, "
                   "for `stp watch`; needs a causal classifier (`stp train --causal`).")
@_tta_option
@_tta_flip_labels_option
def export_command(model, name, out_root, version, data, labels, streaming, tta, tta_flip_labels):
    """Export a trained classifier for TF Serving: OUT/NAME/VERSION with signatures, assets and warmup.

    With --tta (or --tta-flip-labels) the served answers are those of `stp predict --tta` with the same flags:
    every request runs the model over each patch and its flips (2^k passes for k axes) and averages.
    """
    from stpkeras.export import export_for_serving

    spec = None
    if data is not None:
        from tfrecords_tools.manifest import read_manifest, spec_of

        manifest = read_manifest(data)
        spec = spec_of(manifest)
        labels = labels if labels is not None else tuple(manifest["labels"]) or None
    result = export_for_serving(model, out_root, name, version, labels=labels, spec=spec, streaming=streaming,
                                tta=tta, tta_flip_labels=tta_flip_labels)
    click.echo(f"exported {model} -> {result.path}")
    click.echo(f"  signatures: {', '.join(result.signatures)}")
    if result.tta:
        from stpkeras.artifacts import tta_passes

        click.echo(f"  test-time flips: {', '.join(result.tta)} ({tta_passes(result.tta)} passes a patch)")
    click.echo(f"  {len(result.labels)} classes: {', '.join(result.labels)}")
    click.echo(f"  input: uint8 [batch, {', '.join(map(str, result.spec.shape))}] ({result.spec.describe()})")
    click.echo(f"  warmup: {result.warmup_records} requests in assets.extra/tf_serving_warmup_requests")
    import tensorflow as tf

    # TF Serving must be at least the exporting TF, or loading fails with "Op type not registered".
    click.echo(f"serve it: docker run -p 8500:8500 -p 8501:8501 -v {os.path.abspath(os.path.join(out_root, name))}:"
               f"/models/{name} -e MODEL_NAME={name} tensorflow/serving:{tf.__version__} (or newer)")


@main.command("serving-config")
@click.argument("root", type=click.Path(exists=True, file_okay=False), default="saved_models", required=False)
@click.option("--base-path", default=None, metavar="PATH",
              help="Write PATH/NAME as base paths instead of ROOT's absolute path (e.g. /models in a container).")
def serving_config_command(root, base_path):
    """Print a TF Serving model config (model_config_list) for every model under ROOT."""
    from stpkeras.export import serving_config

    click.echo(serving_config(root, base_path), nl=False)


@main.command("predict")
@click.argument("model", type=click.Path(exists=True))
@click.argument("videos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--server", default=None, metavar="URL", envvar="STP_SERVER",
              help="Run the model on TF Serving: http://HOST:8501/v1/models/NAME (REST) or "
                   "grpc://HOST:8500/NAME (gRPC). MODEL still gives the labels and PatchSpec.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, metavar="K",
              help="Classes listed per video.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per video and line.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Patches per model call (memory stays bounded by it).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              metavar="SECONDS", help="Per-request timeout with --server.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retries (with exponential back-off) when the server is unreachable or times out.")
@click.option("--max-request-mb", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="Split batches so that no request to the server is larger.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=7680 * 4320, show_default=True,
              help="Refuse videos whose frames are larger (decompression-bomb guard).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Multi-label models: a class is named when its probability is at least this.")
@click.option("--timeline", is_flag=True,
              help="Also a label (or values) per temporal window of patches, with its start and end seconds.")
@_tta_option
@_tta_flip_labels_option
def predict_command(model, videos, server, top_k, as_json, batch_size, timeout, retries, max_request_mb, max_pixels,
                    threshold, timeline, tta, tta_flip_labels):
    """Classify or score VIDEOS with MODEL (a SavedModel folder, saved_models/NAME for its newest version, or
    a run folder or .keras file): a classifier's label, a multi-label classifier's labels, a regressor's values.

    Exit code 1 when some videos could not be classified (they are listed with the reason), 2 for a bad
    model, URL or input, 4 when the server does not answer.
    """
    from stpkeras.predict import RemotePredictor, format_table, format_timeline, load, predict_videos
    from stpkeras.serving import connect

    if (tta or tta_flip_labels) and server is not None:
        raise click.UsageError("--tta runs the flips in this process; the server runs the export as it is "
                               "(pass one of --tta and --server; `stp export --tta` serves the flips)")
    predictor = load(model, tta=tta, tta_flip_labels=tta_flip_labels)
    if server is not None:
        client = connect(server, timeout_s=timeout, retries=retries, max_request_mb=max_request_mb)
        predictor = RemotePredictor.like(client, predictor)
    results = []
    for result in predict_videos(predictor, videos, batch_size=batch_size, top_k=top_k, max_pixels=max_pixels,
                                 threshold=threshold, timeline=timeline):
        results.append(result)
        if as_json:
            click.echo(result.to_json())
        elif result.error is not None:
            click.echo(f"{result.video}: {result.error}", err=True)
        elif timeline:
            click.echo(format_timeline(result))
    if not as_json:
        click.echo(format_table(results, top_k))
    sys.exit(EXIT_PARTIAL if any(r.error is not None for r in results) else EXIT_OK)



@main.command("watch")
@click.argument("model", type=click.Path(exists=True))
@click.argument("source")
@click.option("--server", default=None, metavar="URL", envvar="STP_SERVER",
              help="Run the stream on TF Serving (http://HOST:8501/v1/models/NAME or grpc://HOST:8500/NAME); this "
                   "client carries the state. MODEL still gives the labels and PatchSpec.")
@click.option("--realtime", is_flag=True, help="Read a file at its own pace (default: as fast as possible).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="SECONDS", help="End (exit 4) when SOURCE gives no frame for this long.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per answer and line, then a summary line.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Print every N-th frame's answer (every frame still goes through the model).")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, metavar="K")
@click.option("--format", "input_format", default=None, metavar="FORMAT",
              help="FFmpeg input format, e.g. v4l2 (camera, the default for /dev/video*), mpegts, avfoundation.")
@click.option("--max-request-mb", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="With --server: split the streams of a step so that no request is larger.")
def watch_command(model, source, server, realtime, timeout, as_json, every, top_k, input_format, max_request_mb):
    """Label SOURCE while it plays with a causal MODEL (an export of `stp export --streaming`, or a causal run
    folder or .keras file). SOURCE: a video file, - (stdin, e.g. `ffmpeg ... -f mpegts -`), an rtsp:// or
    http:// URL, or a camera device (/dev/video0).

    Prints each frame's label and score (the last T frames' answer), the latency from the frame's arrival to
    its answer and the frames/s kept up with, then a summary. Exit code 0 at the end of the stream, 130 on
    Ctrl-C (after the summary), 4 when SOURCE goes silent for --timeout seconds, 2 for a bad model or source.
    """
    import json

    from stpkeras.watch import WatchConfig, open_streamer, watch

    client = None
    if server is not None:
        from stpkeras.serving import connect

        client = connect(server, timeout_s=max(timeout, 1.0), max_request_mb=max_request_mb)
    streamer = open_streamer(model, client)
    config = WatchConfig(source, realtime=realtime, timeout_s=timeout, every=every, input_format=input_format,
                         top_k=top_k)

    def emit(answer):
        click.echo(json.dumps(answer.to_dict()) if as_json else answer.line())

    summary = watch(streamer, config, emit)
    click.echo(json.dumps(summary.to_dict()) if as_json else summary.line())
    sys.exit(summary.exit_code)


# --- train / evaluate (TFRecords -> run folder -> metrics) --------------------------------------

def _degrade_option(ctx, param, values):
    """`--degrade KIND:PARAM` (repeatable) -> the canonical strings of `stpkeras.degrade`, checked."""
    if not values:
        return ()
    from stpkeras.degrade import describe, parse_degrade
    try:
        return describe(parse_degrade(values))
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e


def _model_args(ctx, param, values):
    """KEY=VALUE pairs; VALUE is JSON when it parses (8, 0.1, [1,3,3], "small"), else a string."""
    import json
    options = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", ctx=ctx, param=param)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options[key.strip().replace("-", "_")] = tuple(parsed) if isinstance(parsed, list) else parsed
    return tuple(options.items())


def _shake_limits(text: str):
    """`--shake SHIFT,DEGREES,ZOOM` -> the stabilize task's options (ranges checked by the task)."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise click.BadParameter(f"expected three numbers SHIFT,DEGREES,ZOOM (e.g. 1.0,1.5,2); received {text!r}",
                                 param_hint="--shake")
    return tuple(zip(("shift", "degrees", "zoom_percent"), values))


@main.command("train")
@click.argument("data", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Run folder: run.json, best.keras, last.keras, history.csv, logs/, curves.png, backup/.")
@click.option("--model", "model_name", default=None,
              type=click.Choice(["stcnn", "c3d", "r2plus1d", "resnet3d", "vivit", "unet3d", "dncnn3d", "motionnet",
                                 "corrnet", "softmotion"]),
              help="Model family (default: stcnn; dncnn3d for --task enhance, unet3d for segment, softmotion for "
                   "stabilize).")
@click.option("--model-arg", "model_args", multiple=True, callback=_model_args, metavar="KEY=VALUE",
              help="A model option, repeatable (e.g. filters=16, kernel_size=[3,5,5], width=full, depth=34).")
@click.option("--causal", is_flag=True,
              help="A causal model (stcnn, r2plus1d, resnet3d): its answer at a frame sees no later frame, so "
                   "`stp export --streaming` can serve it frame by frame (same as --model-arg causal=true).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs (default 10; with --minutes, the most epochs: default no cap that matters).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None, metavar="M",
              help="Time budget: train for at most M minutes (training wall time, a resumed run's earlier "
                   "sessions included), ending the epoch under way when it is spent; the learning-rate "
                   "schedule spans the steps the budget holds. run.json records the budget. --task enhance on "
                   "CPUs alone with at most 120 core-minutes (M x cores) and no model option given trains on "
                   "32x32 crops at lr 1e-3 (--crop), in float32 with batches of 2 (--batch-size), and says so.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Steps per epoch (default: the training patches // the global batch); short epochs give "
                   "large data more frequent checkpoints and validation.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Patches per replica; the global batch is this x replicas (default 32; 8 for --task enhance).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (AdamW; default 1e-3; 2e-3 for --task enhance).")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="Learning-rate schedule over all steps.")
@click.option("--warmup", type=click.FloatRange(min=0, max=1, max_open=True), default=0.05, show_default=True,
              metavar="FRACTION", help="Fraction of all steps over which the learning rate rises linearly from 0 "
                                       "to --lr (0: none).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--augment", default=None, metavar="LIST",
              help="Training augmentations: any of flip,crop,color,shift,speed,letterbox,rescale,reencode, or 'none' "
                   "(default crop,color; flip for --task enhance and regress; the copy views "
                   "shift,speed,crop,letterbox,rescale,color,reencode for --task embed). No flip by default "
                   "otherwise: a horizontal flip swaps left and right motion. Enhancement avoids crop: its "
                   "nearest-neighbour resize puts blocks in the clean target; "
                   "regression avoids crop and color, which change what values measured in the pixels.")
@click.option("--train-split", default=None, metavar="SPLIT",
              help="Split to train on (default: 'train', or every split but validation when there is none).")
@click.option("--val-split", default=None, metavar="SPLIT",
              help="Split to validate on (default: 'val' when DATA has it; 'none' for no validation).")
@click.option("--strategy", type=click.Choice(["auto", "mirrored", "one", "multiworker"]), default="auto",
              show_default=True, help="auto: MirroredStrategy over all GPUs (or over --devices CPU devices), "
                                      "else one device. multiworker reads TF_CONFIG.")
@click.option("--devices", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use the first N GPUs, or N logical CPU devices when there is no GPU (to test mirroring).")
@click.option("--mixed-precision/--no-mixed-precision", default=None,
              help="Train with float16 compute on GPUs (bfloat16 on CPUs); logits stay float32. Default: bfloat16 "
                   "for --task enhance on a CPU that computes it natively (AMX, AVX-512 BF16) and no GPU, else "
                   "float32. Saved models predict and export in float32.")
@click.option("--jit", is_flag=True, help="Compile the train step with XLA.")
@click.option("--seed", type=int, default=None, help="Seeds weights, data order and augmentation.")
@click.option("--deterministic", is_flag=True,
              help="Same batches and same weights on every run (needs --seed), also when a run was killed and "
                   "resumed (except --strategy multiworker and --data-service).")
@click.option("--class-weight", is_flag=True, help="Weight classes by inverse frequency in the training split.")
@click.option("--shuffle-buffer", type=click.IntRange(min=1), default=1024, show_default=True, metavar="N")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from its last finished epoch.")
@click.option("--verbose", type=click.IntRange(0, 2), default=1, show_default=True,
              help="1: a progress bar per epoch; 2: one line per epoch; 0: quiet.")
@click.option("--data-service", default=None, metavar="grpc://HOST:PORT", envvar="STP_DATA_SERVICE",
              help="Decode and augment on a tf.data service (`stp data-service dispatcher/worker`), "
                   "distributed_epoch: each record once per epoch.")
@click.option("--trace-records", "trace_dir", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Write the video id and grid index of every training record this process receives to DIR "
                   "(multiworker: TYPE-INDEX.jsonl per worker; --data-service: trainer.txt), to check data splitting.")
@click.option("--task", type=click.Choice(["classify", "regress", "embed", "segment", "enhance", "pretrain",
                                           "stabilize"]),
              default="classify", show_default=True,
              help="classify: a label per patch (multi-label data: any number, see --multi-label); "
                   "regress: the records' values (value/data), K numbers per patch; "
                   "pretrain: masked autoencoding (vivit), labels ignored, for --init-from; "
                   "enhance: restore degraded patches (unet3d, dncnn3d); "
                   "embed: self-supervised contrastive embeddings (any backbone) for `stp index`; "
                   "segment: a class per voxel (data with masks) or per frame (data with intervals), unet3d; "
                   "stabilize: camera motion between frames from patches shaken on the fly, for `stp stabilize`.")
@click.option("--degrade", multiple=True, metavar="KIND[:PARAM]", callback=_degrade_option,
              help="enhance: a degradation applied on the fly, repeatable: noise:25 (Gaussian sigma, 0-255), "
                   "noise:10-40 (sigma drawn per patch), poisson:30 (peak), blur:1.5 (sigma px), motion:7 "
                   "(length px), jpeg:20 (quality), flicker:0.1 (amplitude). A kind alone draws from its default "
                   "range (noise: 0-50, level-blind), the recommended recipe. Not needed for paired data.")
@click.option("--crop", type=click.IntRange(min=0), default=None, metavar="N",
              help="enhance: train on random N x N crops of the patches (0: whole patches, the default; on a short "
                   "CPU budget 32). Fully convolutional models only (dncnn3d).")
@click.option("--soften", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
              help="enhance: the share of clean patches downscaled to 25-75% and back before they are degraded, so "
                   "that the model also learns footage with less detail than its own (default 0.5 on "
                   "self-supervised rgb data; 0 on pairs, where it is refused).")
@click.option("--loss", "loss", type=click.Choice(["l1", "l2", "mse", "huber"]), default=None,
              help="enhance: the pixel loss, l1 (default) or l2; regress: mse (default) or huber (delta: one "
                   "standard deviation of the training values).")
@click.option("--multi-label", is_flag=True, default=None,
              help="classify: sigmoid outputs and binary cross-entropy. Automatic for multi-label data (its "
                   "dataset.json says label_mode 'multi'); on single-label data, one-hot targets.")
@click.option("--flip-labels", multiple=True, metavar="AXIS:A=B",
              help="classify: a flip that swaps two mirrored classes, repeatable: h:left=right (left-right flip), "
                   "v:up=down (top-bottom), t:left=right (the clip played backwards), d:left=up (rows become "
                   "columns; square patches). Each axis flips half the "
                   "training patches and swaps the named labels; other classes must look alike mirrored. For "
                   "motion classes, which --augment flip would mislabel.")
@click.option("--tta-flip-labels", multiple=True, metavar="AXIS:A=B",
              help="classify: a symmetry of the task for test time only (as --flip-labels), repeatable: recorded in "
                   "run.json, so that --tta (stp evaluate, predict, export) averages over it too without naming it "
                   "again. E.g. time reversal for camera motion: t:left=right and t:up=down.")
@click.option("--mask-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="FRACTION", help="pretrain: the share of tubelet tubes hidden from the encoder (default 0.9).")
@click.option("--shake", default=None, metavar="SHIFT,DEGREES,ZOOM",
              help="stabilize: the largest shake drawn per patch: translation as a share of the margin the 1.25x "
                   "view leaves (0-1), rotation in degrees, zoom in percent (default 0.5,1.5,2).")
@click.option("--init-from", type=click.Path(exists=True), default=None, metavar="RUN|MODEL.keras",
              help="Start the backbone from an earlier run (any task; e.g. --task pretrain or embed): layers "
                   "matching by name and shape are taken, the head is new. run.json records which.")
@click.option("--freeze-backbone", is_flag=True, help="With --init-from: train the new head only (linear probe).")
@click.option("--backbone-lr-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              metavar="F", help="With --init-from: the backbone's learning rate is --lr x F.")
@click.option("--layer-decay", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="F",
              help="With --init-from, vivit: each transformer block below the head learns at F x the one above.")
def train_command(data, out, model_name, model_args, causal, epochs, minutes, steps_per_epoch, batch_size, lr,
                  schedule, warmup, weight_decay, augment,
                  train_split, val_split, strategy, devices, mixed_precision, jit, seed, deterministic,
                  class_weight, shuffle_buffer, resume, verbose, data_service, trace_dir, task, degrade, crop, soften,
                  loss, multi_label, flip_labels, tta_flip_labels, mask_ratio, shake, init_from, freeze_backbone,
                  backbone_lr_scale, layer_decay):
    """Train a model on the patches in DATA (a folder written by `stp convert`) into RUN_DIR.

    A killed run started again with --resume goes on from its last finished epoch.
    """
    from stpkeras.budget import summary as budget_summary
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.verify import reading_records

    if deterministic and seed is None:
        raise click.BadParameter("--deterministic needs --seed", param_hint="--deterministic")
    try:
        if (degrade or crop is not None or soften is not None) and task != "enhance":
            raise click.BadParameter("--degrade, --crop, --soften and --loss l1|l2 are options of --task enhance",
                                     param_hint="--task")
        losses = {"enhance": ("pixel_loss", ("l1", "l2")), "regress": ("value_loss", ("mse", "huber"))}
        if loss and loss not in losses.get(task, ("", ()))[1]:
            raise click.BadParameter(f"--loss {loss}: expected l1 or l2 with --task enhance, mse or huber with "
                                     f"--task regress (received --task {task})", param_hint="--loss")
        if multi_label and task != "classify":
            raise click.BadParameter("--multi-label is an option of --task classify", param_hint="--task")
        if (flip_labels or tta_flip_labels) and task != "classify":
            raise click.BadParameter("--flip-labels and --tta-flip-labels are options of --task classify",
                                     param_hint="--task")
        # Model, augmentation and task options left out (None) are the task's defaults (stpkeras.tasks).
        if mask_ratio is not None and task != "pretrain":
            raise click.BadParameter("--mask-ratio is an option of --task pretrain", param_hint="--task")
        if causal:
            from stpkeras.models import model_options
            from stpkeras.tasks import get_task
            family = model_name or get_task(task).default_model
            if "causal" not in model_options(family):
                raise click.BadParameter(f"--causal: model {family!r} has no causal form (expected stcnn, r2plus1d "
                                         "or resnet3d)", param_hint="--causal")
            model_args = tuple(dict(model_args, causal=True).items())
        if shake is not None and task != "stabilize":
            raise click.BadParameter("--shake is an option of --task stabilize", param_hint="--task")
        task_options = tuple((k, v) for k, v in (("degrade", degrade), (losses.get(task, ("",))[0], loss),
                                                  ("multi_label", multi_label), ("flip_labels", tuple(flip_labels)),
                                                  ("tta_flip_labels", tuple(tta_flip_labels)),
                                                  ("mask_ratio", mask_ratio)) if v)
        if crop is not None:
            task_options += (("crop", crop),)   # 0 too: whole patches, not the CPU budget's crops
        if soften is not None:
            task_options += (("soften", soften),)   # 0 too: none, not the task's default
        if shake is not None:
            task_options += _shake_limits(shake)
        if epochs is None:
            epochs = 10 if minutes is None else 1000
        config = TrainConfig(data=data, out=out, model=model_name, model_options=model_args, epochs=epochs,
                             minutes=minutes, steps_per_epoch=steps_per_epoch, task=task, task_options=task_options,
                             batch_size=batch_size, lr=lr, schedule=schedule, warmup=warmup, weight_decay=weight_decay,
                             augment=augment, train_split=train_split, val_split=val_split, strategy=strategy,
                             devices=devices, mixed_precision=mixed_precision, jit=jit, seed=seed,
                             deterministic=deterministic, resume=resume, class_weight=class_weight,
                             shuffle_buffer=shuffle_buffer, verbose=verbose, data_service=data_service,
                             trace_dir=trace_dir, init_from=init_from, freeze_backbone=freeze_backbone,
                             backbone_lr_scale=backbone_lr_scale, layer_decay=layer_decay)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    with reading_records(data):  # a damaged shard: one line naming it (exit 3)
        run = train(config, echo=click.echo)
    metrics = run["metrics"]
    best = metrics.get("best", {})
    budget = run.get("budget")
    if budget:
        click.echo(budget_summary(budget))
    click.echo(f"{out}: {metrics['epochs']} epochs in {run['seconds']:.0f}s; best epoch {metrics.get('best_epoch')} "
               + ", ".join(f"{k} {v:.4f}" for k, v in best.items()
                           if k in ("loss", "accuracy", "val_loss", "val_accuracy", "psnr", "val_psnr", "val_ssim",
                                    "val_pr_auc", "val_mae"))
               + "; best.keras, last.keras, history.csv, curves.png, logs/")


@main.command("evaluate")
@click.argument("model", type=click.Path(exists=True))
@click.argument("data", type=click.Path())
@click.option("--split", default=None, help="Split to evaluate (default: 'test', else 'val').")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, metavar="K",
              help="k of the top-k accuracy (at most the number of classes).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for eval-SPLIT.json and the confusion PNGs (default: the run folder).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: 'patch' and 'video' sections with accuracy, precision, recall, "
                   "f1 (macro), per_class and confusion.")
@click.option("--degrade", multiple=True, metavar="KIND:PARAM", callback=_degrade_option,
              help="Enhancement runs: degradations of the clean patches (default: the run's own), repeatable.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Enhancement runs: seed of the degradations (the same seed, the same inputs).")
@click.option("--no-baselines", is_flag=True, help="Enhancement runs: skip the classical baselines.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Multi-label runs: the probability at which a class counts as predicted "
                                      "(precision, recall, F1).")
@_tta_option
@_tta_flip_labels_option
def evaluate_command(model, data, split, batch_size, top_k, out, as_json, degrade, seed, no_baselines, threshold,
                     tta, tta_flip_labels):
    """Evaluate MODEL (a run folder or a .keras file) on a split of DATA, per patch and per video.

    An enhancement run (--task enhance) reports PSNR/SSIM of the degraded input, of classical
    baselines and of the model instead.
    """
    import json

    from stpkeras.evaluate import EvalConfig, evaluate

    result = evaluate(EvalConfig(model=model, data=data, split=split, batch_size=batch_size, top_k=top_k,
                                 out=out, degrade=degrade, seed=seed, baselines=not no_baselines, threshold=threshold,
                                 tta=tta, tta_flip_labels=tta_flip_labels))
    if as_json:
        click.echo(json.dumps(result))
        return
    if result.get("task") == "regress":
        def num(v):
            return "n/a" if v is None else f"{v:.4f}"
        for level in ("patch", "video"):
            m = result[level]
            click.echo(f"{level:>5}: {m['count']} | MAE {num(m['mae'])} | RMSE {num(m['rmse'])} | "
                       f"SROCC {num(m['srocc'])} | PLCC {num(m['plcc'])}")
        width = max(len(name) for name in result["labels"])
        click.echo(f"{'value':<{width}}  MAE       RMSE      SROCC     PLCC      (video level)")
        for name, v in result["video"]["per_value"].items():
            click.echo(f"{name:<{width}}  " + "  ".join(f"{num(v[k]):<8}" for k in ("mae", "rmse", "srocc", "plcc")))
        if result["video"]["undefined_correlations"]:
            click.echo(f"no correlation (constant, or fewer than 2 videos): "
                       f"{', '.join(result['video']['undefined_correlations'])}")
        click.echo(f"wrote {result['json']}")
        return
    if result.get("multi_label"):
        for level in ("patch", "video"):
            m = result[level]
            click.echo(f"{level:>5}: {m['count']} | mAP {'n/a' if m['map'] is None else format(m['map'], '.4f')} | "
                       f"F1@{m['threshold']:g} {m['f1']:.4f} (micro {m['micro_f1']:.4f}) | "
                       f"exact match {m['exact_match']:.4f}")
            if m["excluded_from_map"]:
                click.echo(f"       not in the mAP (no positive {level}): {', '.join(m['excluded_from_map'])}")
        width = max(len(name) for name in result["labels"])
        click.echo(f"{'class':<{width}}  AP      precision  recall  F1      (video level)")
        for name, c in result["video"]["per_class"].items():
            ap = "n/a   " if c["ap"] is None else f"{c['ap']:.4f}"
            click.echo(f"{name:<{width}}  {ap}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  "
                       f"n={c['support']}")
        click.echo(f"wrote {result['json']}")
        return
    if result.get("task") == "enhance":
        from stpkeras.baselines import param_text

        click.echo(f"{result['split']}: {result['patches']} patches, "
                   + (", ".join(result["degrade"]) or "paired targets") + f" (seed {result['seed']})")
        rows = [("input", result["input"], "")] + [
            (name, v, param_text(v["param"])) for name, v in result["baselines"].items()] + [
            ("model", result["output"], "")]
        click.echo(f"{'':<11} {'PSNR dB':>8} {'SSIM':>7}  parameter")
        for name, v, param in rows:
            click.echo(f"{name:<11} {v['psnr']:>8.2f} {v['ssim']:>7.4f}  {param}")
        gain = result["gain_db"]
        click.echo(f"model gain: {gain['over_input']:+.2f} dB over the input"
                   + (f", {gain['over_best_baseline']:+.2f} dB over {result['best_baseline']}"
                      if result["best_baseline"] else ""))
        click.echo(f"wrote {result['json']}")
        return
    for level in ("patch", "video"):
        m = result[level]
        topk = next(k for k in m if k.startswith("top"))
        click.echo(f"{level:>5}: {m['count']} | accuracy {m['accuracy']:.4f} | precision {m['precision']:.4f} | "
                   f"recall {m['recall']:.4f} | F1 {m['f1']:.4f} | {topk} {m[topk]:.4f}")
    width = max(len(name) for name in result["labels"])
    click.echo(f"{'class':<{width}}  precision  recall  F1      (video level)")
    for name, c in result["video"]["per_class"].items():
        click.echo(f"{name:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  n={c['support']}")
    click.echo(f"wrote {result['json']} and confusion PNGs")


# --- index / search (run folder or export + videos -> index folder -> nearest videos) -------------


@main.command("index")
@click.argument("model", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True), metavar="VIDEOS_OR_DATA...")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), metavar="INDEX",
              help="Index folder to write (index.json, embeddings.npy, center.npy, windows.npy, window_offsets.npy).")
@click.option("--split", default=None, metavar="SPLIT",
              help="With a converted folder: the split to index (default: every split).")
@click.option("--backend", type=click.Choice(["exact", "faiss"]), default="exact", show_default=True,
              help="exact: matrix product in TensorFlow; faiss: approximate HNSW graph (pip install 'stpkeras[ann]'), "
                   "for collections of about 100k videos and more.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Patches per model call.")
@click.option("--no-center", "no_center", is_flag=True,
              help="Do not subtract the mean embedding of the indexed videos before normalising.")
@click.option("--aggregate", type=click.Choice(["windows", "mean"]), default="windows", show_default=True,
              help="windows: keep one embedding per temporal window and score a query by its windows' best "
                   "matches (finds trimmed and shifted copies); mean: one embedding a video (semantic retrieval).")
@click.option("--pool", default="mean", show_default=True, metavar="mean|grid:N",
              callback=_checked_by("stpkeras.embedding", "parse_pool"),
              help="How a patch's last feature map becomes its features: mean: the global average; grid:N: the "
                   "average over time and over each cell of an N x N grid (keeps the picture's layout; for "
                   "finding copies). grid:N needs an stcnn-family model (run folder or .keras). Recorded in "
                   "index.json; `stp search` pools queries the same way.")
@click.option("--strip-bars", is_flag=True,
              help="Read every video inside its black bars (letterbox, pillarbox), found by a first pass over its "
                   "frames; `stp search` reads queries the same way. For finding copies.")
@click.option("--views", default="1", show_default=True, metavar="FRACTIONS",
              help="Comma-separated central fractions of the picture each video is indexed as (one entry "
                   "each; a video scores its best), e.g. 1,0.85,0.7: a copy cut from the middle of its source's "
                   "frame meets a view at about its own framing. For finding copies.")
def index_command(model, inputs, out, split, backend, batch_size, no_center, aggregate, pool, strip_bars, views):
    """Embed videos (files, folders of videos, or one converted folder) with MODEL and write an index.

    MODEL: a run folder, a .keras file or an export (saved_models/NAME[/VERSION]). A window's
    embedding is the mean of its patches' L2-normalised pooled features (a window: the patches that
    share a first frame), a video's the mean of all its patches. Exit code 1 when some
    videos could not be embedded (listed with the reason and in index.json).
    """
    from stpkeras.index import Reading, build_index

    try:
        reading = Reading(strip_bars, tuple(float(v) for v in views.split(",")))
    except ValueError:
        raise click.BadParameter(f"expected distinct fractions in (0, 1] separated by commas, e.g. 1,0.85,0.7; "
                                 f"received {views!r}", param_hint="--views") from None

    def report(video, error):
        if error is not None:
            click.echo(f"warning: {error}", err=True)

    index = build_index(model, inputs, out, split=split, backend=backend, batch_size=batch_size,
                        center=not no_center, aggregate=aggregate, pool=pool, on_video=report, reading=reading)
    failed = index.info.get("failed", [])
    click.echo(f"indexed {len(set(index.ids))} videos ({sum(index.info.get('patches', [])):,} patches, {index.dim}-d, "
               f"{index.backend}) in {index.info['seconds']:.1f}s -> {out}"
               + (f"; {len(failed)} failed" if failed else ""))
    sys.exit(EXIT_PARTIAL if failed else EXIT_OK)


@main.command("search")
@click.argument("index_dir", metavar="INDEX", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1, required=True, type=click.Path(exists=True), metavar="QUERY_VIDEO...")
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Results per query.")
@click.option("--model", default=None, type=click.Path(exists=True),
              help="Embed queries with this model (default: the one the index was built with).")
@click.option("--split", default=None, metavar="SPLIT",
              help="When QUERY is a labelled converted folder: its split to use as queries; prints recall@1/@5 "
                   "and mAP (same class = relevant) instead of results.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per result and line: query, video, score, rank (and matched, with --rerank).")
@click.option("--rerank", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Re-rank the first N results by the fine detail of the query's frames aligned to each video's "
                   "(a copy holds its source's very frames): tells apart stretches of one static shot that the "
                   "embedding cannot. The indexed videos must still be readable at their paths. For finding "
                   "copies; each result compared costs two reads of its video (about 0.75 s for a 90-frame clip "
                   "on 2 cores).")
def search_command(index_dir, queries, k, model, split, as_json, rerank):
    """Print the K videos of INDEX nearest to each QUERY_VIDEO, with cosine scores (best first).

    With --rerank, the compared results come first, best match first, and show that score (matched) too.
    Exit code 1 when some queries could not be embedded.
    """
    import json

    from stpkeras.index import VideoIndex, embed_records, evaluate_retrieval, is_converted, load_embedder, search_videos

    index = VideoIndex.load(index_dir)
    model = model or index.model
    if len(queries) == 1 and is_converted(queries[0]):
        result = evaluate_retrieval(index, embed_records(load_embedder(model, index.pool), queries[0], split))
        click.echo(json.dumps(result) if as_json else
                   f"{result['queries']} queries against {result['gallery']} videos: "
                   + ", ".join(f"{key} {value:.4f}" for key, value in result.items()
                               if key.startswith("recall") or key == "map"))
        return
    failed = 0
    for query, hits, error in search_videos(index, model, queries, k, rerank=rerank):
        if error is not None:
            failed += 1
            click.echo(json.dumps({"query": query, "error": error}) if as_json else f"{query}: {error}",
                       err=not as_json)
            continue
        if as_json:
            for hit in hits:
                click.echo(json.dumps({"query": query, **json.loads(hit.to_json())}))
        else:
            click.echo(query)
            for hit in hits:
                label = f"  [{hit.label}]" if hit.label else ""
                checked = "" if hit.matched is None else f"  matched {hit.matched:+.4f}"
                click.echo(f"  {hit.rank:>3}  {hit.score:+.4f}  {hit.video}{label}{checked}")
    sys.exit(EXIT_PARTIAL if failed else EXIT_OK)


# --- enhance (a whole video through an enhancement model) ------------------------------------


@main.command("enhance")
@click.argument("model", metavar="RUN_DIR_OR_MODEL", type=click.Path(exists=True))
@click.argument("video", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False), metavar="OUT.mp4",
              help="The enhanced video (H.264 at the source's frame rate).")
@click.option("--reference", default=None, type=click.Path(exists=True, dir_okay=False), metavar="CLEAN",
              help="The clean video: print PSNR/SSIM of the input and of the output against it.")
@click.option("--overlap", default=None, metavar="TxHxW", callback=_triple,
              help="Overlap of neighbouring patches, at most half the patch (default: a quarter of it).")
@click.option("--lossless", is_flag=True,
              help="Write lossless RGB H.264 (libx264rgb, qp 0), so measurements are not blurred by the codec.")
@click.option("--crf", type=click.IntRange(0, 51), default=None,
              help="H.264 quality (lower: better). Default: 10 for a model trained on pairs (a restoration gains "
                   "tenths of a dB, and crf 18 writes half of it away), 18 otherwise.")
@click.option("--side-by-side", default=None, type=click.Path(dir_okay=False), metavar="FILE.mp4",
              help="Also write input | output (| reference) side by side.")
@click.option("--frame-png", default=None, type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Write one frame as input | output (| reference) to a PNG.")
@click.option("--frame", "frame_index", type=click.IntRange(min=0), default=None, metavar="N",
              help="The frame of --frame-png (default: the middle one).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Patches per model call (memory stays bounded by it).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=7680 * 4320, show_default=True,
              help="Refuse videos whose frames are larger (decompression-bomb guard).")
@click.option("--tta", is_flag=True,
              help="Enhance each patch as it is and flipped left-right, top-bottom, backwards in time and every "
                   "combination, and average the 8 outputs flipped back (8x the model's work; about +0.25 dB).")
def enhance_command(model, video, out, reference, overlap, lossless, crf, side_by_side, frame_png, frame_index,
                    batch_size, as_json, max_pixels, tta):
    """Enhance VIDEO with MODEL (a run folder of --task enhance, a .keras file in one, or its export).

    The video is cut into overlapping patches of the model's size, enhanced in batches and put back
    by overlap-add with a smooth window, streaming: any length, any frame size.
    """
    import json

    from stpkeras.enhance import enhance_video, load_enhancer

    enhancer = load_enhancer(model, tta=tta)
    result = enhance_video(enhancer, video, out, overlap=overlap, batch_size=batch_size, crf=crf,
                           lossless=lossless, reference=reference, side_by_side=side_by_side,
                           frame_png=frame_png, frame_index=frame_index, max_pixels=max_pixels)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    written = "lossless" if result.crf is None else f"crf {result.crf}"
    click.echo(f"{out}: {result.frames} frames of {result.width}x{result.height} at {result.fps:g} fps ({written}), "
               f"{result.patches} patches, {result.seconds:.1f}s ({result.model_s:.1f}s in the model)")
    if result.reference:
        click.echo(f"against {reference}: input PSNR {result.input_psnr:.2f} dB SSIM {result.input_ssim:.4f} -> "
                   f"output PSNR {result.output_psnr:.2f} dB SSIM {result.output_ssim:.4f} "
                   f"({result.output_psnr - result.input_psnr:+.2f} dB)")
    for path in (side_by_side, frame_png):
        if path:
            click.echo(f"wrote {path}")


# --- stabilize (a shaky video through a motion model) -----------------------------------------


def _crop_option(ctx, param, value):
    """--crop: auto, none, or a cropping ratio (`stabilize.crop_ratio`), checked before any work."""
    from stpkeras.stabilize import crop_ratio

    try:
        ratio = crop_ratio(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e
    return value if ratio is None else ratio


@main.command("stabilize")
@click.argument("model", metavar="RUN_DIR_OR_MODEL", type=click.Path(exists=True))
@click.argument("video", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False), metavar="OUT.mp4",
              help="The stabilized video (H.264 at the source's frame rate, its audio copied).")
@click.option("--smoothing", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              metavar="SECONDS", help="Sigma of the Gaussian that smooths the camera path (larger: steadier, "
                                      "more cropping).")
@click.option("--crop", default="auto", show_default=True, metavar="auto|none|RATIO", callback=_crop_option,
              help="auto: zoom in just enough (at most 1.5x) that no border shows; none: black borders; a cropping "
                   "ratio such as 0.85: the output shows that share of the frame, and the path is the steadiest "
                   "one this crop leaves room for, counted from the Gaussian path of --smoothing (so its pans are "
                   "kept).")
@click.option("--side-by-side", default=None, type=click.Path(dir_okay=False), metavar="FILE.mp4",
              help="Also write input | output side by side.")
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True, help="H.264 quality (lower: better).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows per model call.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object, with cropping ratio, distortion and stability score "
                   "of input and output.")
@click.option("--motion-size", type=click.IntRange(min=48), default=None, metavar="PIXELS",
              help="Side of the window the motion model reads (softmotion only; default: the size it was trained "
                   "at). Larger is finer and slower; the window spans 80% of the frame's shorter side, so 144 reads "
                   "a 320x180 frame at full scale (docs/stabilization.md: 180 measured best there).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=7680 * 4320, show_default=True,
              help="Refuse videos whose frames are larger (decompression-bomb guard).")
def stabilize_command(model, video, out, smoothing, crop, side_by_side, crf, batch_size, as_json, motion_size,
                      max_pixels):
    """Stabilize VIDEO with MODEL (a run folder of --task stabilize, or a .keras file in one).

    The model estimates the motion between neighbouring frames over overlapping windows; the camera
    path is smoothed and every frame warped onto the smooth path.
    """
    import json

    from stpkeras.stabilize import load_motion_model, stabilize_video

    result = stabilize_video(load_motion_model(model, motion_size), video, out, smoothing=smoothing, crop=crop,
                             side_by_side=side_by_side, crf=crf, batch_size=batch_size, max_pixels=max_pixels)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(f"{out}: {result.frames} frames of {result.width}x{result.height} at {result.fps:g} fps, zoom "
               f"{result.zoom:.3f}{', audio copied' if result.audio else ''}, {result.seconds:.1f}s; stability "
               f"{result.input['stability']:.3f} -> {result.output['stability']:.3f}, cropping "
               f"{result.output['cropping']:.3f}, distortion {result.output['distortion']:.3f}")
    if side_by_side:
        click.echo(f"wrote {side_by_side}")


# --- data-service (tf.data service servers for `stp train --data-service`) ---------------------


@main.group("data-service")
def data_service_group():
    """Run a tf.data service: one dispatcher, any number of CPU workers that decode for `stp train`."""


@data_service_group.command("dispatcher")
@click.option("--port", type=click.IntRange(0, 65535), default=5050, show_default=True,
              help="Port to listen on (0: any).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Journal folder: a restarted dispatcher recovers its jobs from it (fault-tolerant mode).")
@click.option("--worker-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True, metavar="SECONDS",
              help="A worker silent this long is reported missing. Jobs still wait for it: restart a dead worker "
                   "with the same --host and --port (README: tf.data service).")
def dispatcher_command(port, work_dir, worker_timeout):
    """Start a dispatcher and serve until interrupted."""
    from stpkeras.data_service import start_dispatcher

    server = start_dispatcher(port, work_dir, worker_timeout)
    click.echo(f"dispatcher listening on {server.target} (train with --data-service {server.target})", err=True)
    server.join()


@data_service_group.command("worker")
@click.option("--dispatcher", required=True, metavar="HOST:PORT",
              callback=_checked_by("stpkeras.supervise", "service_address"),  # checked before anything starts
              help="The dispatcher to register with.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port to listen on (0: any).")
@click.option("--host", default=None, metavar="HOST",
              help="The name the trainer reaches this machine by (default: this machine's host name).")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Serve from a child process and start it again at the same HOST:PORT when it dies, so a "
                   "training epoch waiting on it goes on (with --port 0, one free port is kept for every restart).")
def worker_command(dispatcher, port, host, restart):
    """Start a worker (it runs the trainer's input pipeline) and serve until interrupted."""
    import socket

    host = host or socket.gethostname()
    if restart:
        from stpkeras import supervise

        port = port or supervise.free_port()
        click.echo(f"worker {host}:{port}: serving from a child process, started again if it dies", err=True)
        code = supervise.supervise(supervise.worker_command(dispatcher, port, host), f"worker {host}:{port}",
                                   echo=lambda line: click.echo(line, err=True))
        if code:
            raise SystemExit(code)
        return

    from stpkeras.data_service import start_worker

    server = start_worker(dispatcher, port, host)
    click.echo(f"worker registered with {dispatcher}", err=True)
    server.join()


def run():
    """The `stp` console script: `main`, then an exit that survives tensorflow-io's S3 teardown.

    See `tfrecords_tools.storage.exit_process`: a process that used s3:// would
    otherwise abort at exit with code 134 after finishing its work.
    """
    from stpkeras.allocator import one_malloc_arena
    from tfrecords_tools.storage import exit_process

    one_malloc_arena()  # before TensorFlow starts threads: bounded, faster input pipelines
    try:
        code = main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        click.echo(str(code), err=True)
        code = 1
    exit_process(code)


# --- segment (run folder + video -> overlay video or intervals; + converted data -> metrics) ------


def _overlap_option(ctx, param, value):
    if value is None:
        return None
    from tfrecords_tools.spec import parse_triple
    try:
        return parse_triple(value, "overlap")
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


@main.command("segment")
@click.argument("model", type=click.Path(exists=True), metavar="RUN_DIR_OR_MODEL")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True), metavar="VIDEO_OR_DATA...")
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), metavar="OVERLAY.mp4",
              help="Mask models: the video to write, the classes tinted over the frames (one input video).")
@click.option("--split", default=None, metavar="SPLIT",
              help="With a converted folder: the split to evaluate (default: 'test', else 'val').")
@click.option("--overlap", default=None, metavar="TxHxW", callback=_overlap_option,
              help="Overlap of neighbouring patches (default: a quarter of the patch).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input.")
def segment_command(model, inputs, out, split, overlap, batch_size, as_json):
    """Segment videos with a model trained with --task segment, or evaluate it on converted data.

    A per-voxel model writes OUT (the masks over the video) and prints the share of each class; a
    per-frame model prints the intervals it finds (start, end in seconds, label). Given a converted
    folder, prints mean IoU per class (masks) or frame accuracy and segmental F1@{0.1,0.25,0.5} (frames).
    """
    import json

    from stpkeras.index import is_converted
    from stpkeras.segment import evaluate_segmentation, load_segmenter, segment_video

    segmenter = load_segmenter(model)
    if len(inputs) == 1 and is_converted(inputs[0]):
        result = evaluate_segmentation(segmenter, inputs[0], split, batch_size)
        if as_json:
            click.echo(json.dumps(result))
        elif result["kind"] == "mask":
            click.echo(f"{result['split']}: mean IoU {result['mean_iou']:.4f}, pixel accuracy "
                       f"{result['pixel_accuracy']:.4f}; IoU per class: "
                       + ", ".join(f"{k} {'-' if v is None else format(v, '.4f')}" for k, v in result["iou"].items()))
        else:
            click.echo(f"{result['split']}: {result['videos']} videos, frame accuracy {result['frame_accuracy']:.4f}, "
                       + ", ".join(f"F1@{t} {result['f1@' + t]:.4f}" for t in ("0.1", "0.25", "0.5")))
        return
    if segmenter.kind == "mask" and (out is None or len(inputs) != 1):
        raise click.BadParameter("a per-voxel model writes one overlay video: give one VIDEO and --out",
                                 param_hint="--out")
    for video in inputs:
        result = segment_video(segmenter, video, out, overlap=overlap, batch_size=batch_size)
        if as_json:
            click.echo(json.dumps(result.to_dict()))
        elif result.kind == "mask":
            click.echo(f"{video}: {result.frames} frames -> {out}; "
                       + ", ".join(f"class {k} {v:.1%}" for k, v in result.class_fraction.items()))
        else:
            click.echo(f"{video}: {result.frames} frames")
            for interval in result.intervals:
                click.echo(f"  {interval.start:8.3f}  {interval.end:8.3f}  {interval.label}")


if __name__ == "__main__":  # pragma: no cover
    run()
