"""Model stage: `dncnn3d`, a DnCNN-style residual Conv3D stack for enhancement (`--task enhance`).

uint8 `[B, T, H, W, 3]` -> Normalize -> `depth` Conv3D layers (ReLU between)
-> a residual in `to_unit`'s scale, added to the input in the output layer
'pixels' (float32 values in 0-255 units; see `layers.ResidualPixels`). Every
layer sees the full resolution, so the receptive field grows by
`kernel_size - 1` per layer.

The default enhancer, at 5 layers of 32 filters (88k parameters; an 11x11x11
receptive field covers an 8-frame patch): on the enhancement benchmark
(`benchmarks/enhance.py`: 1,752 patches of 8x64x64, Gaussian noise sigma 25,
24 epochs in 13.4 min on 2 CPU cores) it reached 33.68 dB on unseen footage,
against 32.38 for `unet3d` (468k parameters, 19 epochs in the same time). 8
layers trained slower (49 s an epoch against 31, and a loss still at 12.6
after two epochs where 5 layers reached 7.5).

The ReLU layers start from He initialisation (variance 2 / fan-in, DnCNN's own;
Keras's default Glorot start halves each ReLU layer's signal power): +1.1 dB
at equal steps early in training (`benchmarks/enhance_probe.py`; the figures
are on the benchmarks page, "Enhancement"). It also needs the learning-rate
warmup of `stp train` (`--warmup`): with Adam's full-size first steps the
zero-initialised output layer swings the ReLUs silent and the model stays the
identity.
"""

from __future__ import annotations

import keras

from stpkeras.models import layers


def build_dncnn3d(spec, channels: int = 3, *, depth: int = 5, filters: int = 32, kernel_size=3,
                  downscale: int = 1, dilation: int = 1, factorize: int = 0, deblock: int = 0,
                  name: str = "dncnn3d") -> keras.Model:
    """uint8 `[B, T, H, W, C]` -> float32 pixels `[B, T, H, W, channels]` (layer 'pixels').

    `channels` is the number of output channels, which must equal the input's
    (the residual is added to it). `downscale` f (2, 4 or 8) runs the stack on each
    frame's f x f pixel phases stacked as channels (`[B, T, H/f, W/f, f*f*C]`,
    FFDNet's sub-images; `layers.PixelPhases`) and puts the residual back in place:
    1/f^2 of the voxels per layer, f times the spatial receptive field, and a
    stack that knows where in an f x f block each pixel sits (what a codec's
    block grid needs, when the frames keep it: whole frames, or crops at
    multiples of 8 as codec pairs are trained on). At 32 filters on 2x2 phases a denoising step costs a
    quarter, and 15 minutes of float32 training ended 0.44 dB below the full-resolution stack (issue 20,
    docs/benchmarks.md). `dilation` D > 1 spaces the middle layers' taps in height and
    width, rising 1, 2, ... up to D and back to 1 (IRCNN's schedule): a wider spatial view for the same
    parameters (about 1.3x the CPU a training step at D=3, measured on an AVX2 CPU). `factorize` 1 splits each
    hidden layer in two, a 1 x k x k layer in space then a k x 1 x 1 layer in time with a ReLU between (R(2+1)D's
    factorisation, Tran et al. 2018): the same receptive field from 12 instead of 27 multiplies per filter pair
    at k=3, and twice the nonlinearities. On a CPU in float32 a step cost 0.70-0.89x, and 15 minutes of
    denoising gained +0.13 dB on one kind of unseen footage and lost 0.87 on the other (issue 20,
    docs/benchmarks.md): an option, not the default. `deblock` B > 0 adds a deblocking stage on B x B blocks
    after the output (`layers.ResidualPixels`), its threshold chosen at the end of training: `stp train` adds
    it (8) on paired data.
    """
    if channels != spec.channels:
        raise ValueError(f"Invalid value for argument `channels`. Expected the patch's {spec.channels} channels "
                         f"(the output is input + residual). Received channels={channels!r}")
    depth = layers.positive_ints(depth, "depth")[0]
    if depth < 2:
        raise ValueError(f"Invalid value for argument `depth`. Expected at least 2 layers. Received depth={depth}")
    filters = layers.positive_ints(filters, "filters")[0]
    kernel_size = layers.triple(kernel_size, "kernel_size")
    dilation = layers.positive_ints(dilation, "dilation")[0]
    # Layer i of `depth` (the residual layer last): dilated by min(i + 1, depth - i, dilation).
    rates = [min(i + 1, depth - i, dilation) for i in range(depth)]
    if downscale not in (1, 2, 4, 8) or spec.height % downscale or spec.width % downscale:
        raise ValueError("Invalid value for argument `downscale`. Expected 1, 2, 4 or 8, dividing the patch's "
                         f"height and width ({spec.height}x{spec.width}). Received downscale={downscale!r}")
    if factorize not in (0, 1):
        raise ValueError(f"Invalid value for argument `factorize`. Expected 0 (full k x k x k layers) or 1 (space, "
                         f"then time). Received factorize={factorize!r}")
    layers.require_rgb(spec, "an enhancer")
    # Fully convolutional: any frame size (crops in training, `Enhance.crop`) that `downscale` divides.
    inputs = layers.patch_input(spec, any_size=True)
    x = layers.normalize(spec, inputs)
    if downscale > 1:
        x = layers.PixelPhases(downscale, name="to_phases")(x)
    relu = dict(padding="same", activation="relu", kernel_initializer="he_normal")
    for i in range(depth - 1):
        if factorize:
            x = keras.layers.Conv3D(filters, (1, *kernel_size[1:]), dilation_rate=(1, rates[i], rates[i]),
                                    name=f"conv{i + 1}_space", **relu)(x)
            x = keras.layers.Conv3D(filters, (kernel_size[0], 1, 1), name=f"conv{i + 1}_time", **relu)(x)
        else:
            x = keras.layers.Conv3D(filters, kernel_size, dilation_rate=(1, rates[i], rates[i]), name=f"conv{i + 1}",
                                    **relu)(x)
    # Zero-initialised: the untrained model returns its input, and training starts from there.
    residual = keras.layers.Conv3D(channels * downscale ** 2, kernel_size, padding="same", kernel_initializer="zeros",
                                   name="residual")(x)
    if downscale > 1:
        residual = layers.PixelPhases(downscale, inverse=True, name="from_phases")(residual)
    return keras.Model(inputs, layers.enhance_output(inputs, residual, deblock=deblock), name=name)

