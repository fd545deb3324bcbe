"""Benchmark: an export with the test-time flips baked in (`stp export --tta`) against the same run's plain export.

Both exports of RUN are written to a temporary folder and loaded with `tf.saved_model.load`; their
`serving_default` is timed at batch `--batch` on random uint8 patches, the calls interleaved round by round
(`serve.interleaved`), so the ratio flipped / plain is the cost of the flips on this machine. With `--data`,
both exports are also measured on that converted folder's `--split` through `stp evaluate` (the serving
signature, as TF Serving runs it): the accuracy the flips buy.

    python benchmarks/serve_tta.py RUN --tta-flip-labels t:left=right --tta-flip-labels t:up=down \
        [--data DATA --split test]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from serve import interleaved, percentiles  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder (or .keras file) of a classifier or an enhancer")
    parser.add_argument("--tta-flip-labels", action="append", default=[], metavar="AXIS:A=B",
                        help="flips besides the run's own, as `stp export --tta-flip-labels`")
    parser.add_argument("--batch", type=int, default=32, help="patches a call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=4, help="calls a round")
    parser.add_argument("--data", default=None, help="a converted folder to measure both exports on")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from stpkeras.artifacts import tta_passes
    from stpkeras.evaluate import EvalConfig, evaluate
    from stpkeras.export import export_for_serving
    from stpkeras.signatures import PATCHES, SERVING_DEFAULT

    with tempfile.TemporaryDirectory() as work:
        plain = export_for_serving(args.run, work, "plain")
        flipped = export_for_serving(args.run, work, "flipped", tta=True, tta_flip_labels=args.tta_flip_labels)
        print(f"flips: {', '.join(flipped.tta)} ({tta_passes(flipped.tta)} passes a patch); "
              f"patches {'x'.join(map(str, plain.spec.shape))}, batch {args.batch}", flush=True)
        served = {name: tf.saved_model.load(result.path).signatures[SERVING_DEFAULT]
                  for name, result in (("plain", plain), ("flipped", flipped))}
        rng = np.random.default_rng(0)

        def make_input():
            return tf.constant(rng.integers(0, 256, (args.batch, *plain.spec.shape), dtype=np.uint8))

        fns = {name: (lambda x, f=f: f(**{PATCHES: x})) for name, f in served.items()}
        for fn in fns.values():
            fn(make_input())   # traced and warm before timing
        times = interleaved(fns, make_input, args.rounds, args.calls)
        stats = {name: percentiles(t) for name, t in times.items()}
        for name, s in stats.items():
            print(f"{name:<8} serving_default, batch {args.batch}: p50 {s['p50_ms']:.0f} ms, "
                  f"{args.batch / (s['p50_ms'] / 1000):.0f} patches/s", flush=True)
        print(f"ratio flipped / plain (p50): {stats['flipped']['p50_ms'] / stats['plain']['p50_ms']:.2f}x", flush=True)
        if args.data:
            for name, result in (("plain", plain), ("flipped", flipped)):
                out = evaluate(EvalConfig(model=result.path, data=args.data, split=args.split,
                                          out=os.path.join(work, f"eval-{name}")))
                if "video" in out and "accuracy" in out["video"]:
                    print(f"{name:<8} {args.split}: patch accuracy {out['patch']['accuracy']:.3f}, "
                          f"video accuracy {out['video']['accuracy']:.3f}", flush=True)
                else:
                    print(f"{name:<8} {args.split}: {out.get('output', out.get('patch'))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
