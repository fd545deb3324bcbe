"""Benchmark probe: does dncnn3d leave the identity in a short run? (issue 20, a 5-minute budget's ~100 steps)

Trains the default dncnn3d on random 8x32x32 crops of the first 64 frames of bigbuckbunny (animation), Gaussian
noise sigma drawn in 0-50 per crop, batch 8, AdamW with a linear warmup of WARMUP steps to LR then cosine, and
every 50 steps prints the training loss, the fraction of active units of `conv4` (the ReLU layer in front of the
zero-initialised output layer) and the PSNR on 32 fixed crops of bikes (camera footage) at sigma 25.

    python benchmarks/enhance_probe.py LR WARMUP STEPS [KEY=INT ...]  # e.g. 2e-3 8 150; KEY=INT: a dncnn3d option

The 3D Gaussian filter (sigma 0.5-2, the best on these crops, chosen on them) is printed first, as the baseline
the model must beat. `PROBE_INIT=glorot` starts the ReLU layers from Keras's default (Glorot uniform) instead of
dncnn3d's He initialisation; `PROBE_LOSS=mse` trains on MSE instead of the task's L1.
"""

from __future__ import annotations

import os
import sys
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

import numpy as np

VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "videos")


def crops(frames: np.ndarray, rng, n: int) -> np.ndarray:
    """`n` random uint8 [8, 32, 32, 3] crops of `frames` (uint8 [N, H, W, 3])."""
    t = rng.integers(0, len(frames) - 8, n)
    y = rng.integers(0, frames.shape[1] - 32, n)
    x = rng.integers(0, frames.shape[2] - 32, n)
    return np.stack([frames[a:a + 8, b:b + 32, c:c + 32] for a, b, c in zip(t, y, x)])


def noisy(clean: np.ndarray, sigma, rng) -> np.ndarray:
    return np.clip(np.rint(clean + rng.normal(0, 1, clean.shape) * sigma), 0, 255).astype(np.uint8)


def main(argv) -> int:
    lr, warmup, steps = float(argv[0]), int(argv[1]), int(argv[2])
    options = {k: int(v) for k, v in (a.split("=", 1) for a in argv[3:])}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from stpkeras.models import build_model
    from tfrecords_tools.spec import PatchSpec
    from tfrecords_tools.video import read_frames

    train_frames = read_frames(os.path.join(VIDEOS, "bigbuckbunny.mp4"))[0][:64]
    test_rng = np.random.default_rng(1)
    test_clean = crops(read_frames(os.path.join(VIDEOS, "bikes.mp4"))[0], test_rng, 32).astype(np.float32)
    test_noisy = noisy(test_clean, 25, test_rng)

    def psnr(pred) -> float:
        return float(10 * np.log10(255 ** 2 / np.mean((np.clip(np.rint(pred), 0, 255) - test_clean) ** 2)))

    print(f"noisy test PSNR {psnr(test_noisy.astype(np.float32)):.2f} dB", flush=True)
    from scipy.ndimage import gaussian_filter
    gauss = {s: psnr(np.stack([gaussian_filter(c.astype(np.float32), (s, s, s, 0)) for c in test_noisy]))
             for s in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)}
    best = max(gauss, key=gauss.get)
    print(f"3D Gaussian sigma {best}: test PSNR {gauss[best]:.2f} dB (the baseline)", flush=True)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("dncnn3d", PatchSpec(8, 32, 32), 3, **options)
    if os.environ.get("PROBE_INIT") == "glorot":   # Keras's default start instead of dncnn3d's He (a comparison)
        for layer in model.layers:
            if layer.name.startswith("conv"):
                layer.kernel.assign(keras.initializers.GlorotUniform(seed=0)(layer.kernel.shape))
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps - warmup, alpha=0.01, warmup_target=lr,
                                                      warmup_steps=warmup)
    model.compile(keras.optimizers.AdamW(schedule), os.environ.get("PROBE_LOSS", "mae"))
    probe = keras.Model(model.input, model.get_layer(f"conv{options.get('depth', 5) - 1}").output)
    cpu, wall = time.process_time(), time.monotonic()
    for step in range(1, steps + 1):
        clean = crops(train_frames, rng, 8).astype(np.float32)
        loss = model.train_on_batch(noisy(clean, rng.uniform(0, 50, (8, 1, 1, 1, 1)), rng), clean)
        if step % 50 == 0 or step == steps:
            active = float((np.asarray(probe(test_noisy[:8])) > 0).mean())
            print(f"lr {lr:g} warmup {warmup} step {step}: loss {float(loss):.2f}, conv4 active {active:.3f}, "
                  f"test PSNR {psnr(np.asarray(model.predict(test_noisy, verbose=0))):.2f} dB, "
                  f"{time.process_time() - cpu:.0f} CPU-s, {time.monotonic() - wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["2e-3", "8", "150"]))
