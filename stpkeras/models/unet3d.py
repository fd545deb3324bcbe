"""Model stage: `unet3d`, a Conv3D encoder-decoder with skip connections for enhancement (`--task enhance`).

uint8 `[B, T, H, W, 3]` -> Normalize -> an encoder of `len(filters)` levels,
each halving height and width (never time: patches are only a few frames long)
-> a decoder that doubles them back and concatenates the encoder's map of the
same size (the skip) -> a residual in `to_unit`'s scale, added to the input in
the output layer 'pixels' (float32 values in 0-255 units).

Why this shape: a voxel-wise cost per layer of `voxels x filters_in x
filters_out` stays constant when the filters double as the area quarters, so
the coarse levels see a large spacetime neighbourhood for the cost of a few
full-resolution layers. The segmenter builds on its trunk. For denoising,
`dncnn3d` is the default: on the enhancement benchmark (2 CPU cores, 13.4
min) it reached 33.68 dB where this network, with 5x its parameters and
about the same cost per step, reached 32.38.
"""

from __future__ import annotations

import keras

from stpkeras.models import layers


def check_levels(spec, filters) -> None:
    """Every level halves height and width: the patch's sides must be divisible by 2^(levels-1)."""
    scale = 2 ** (len(filters) - 1)
    if spec.height % scale or spec.width % scale:
        raise ValueError(f"Invalid value for argument `filters`. Expected at most as many levels as halvings of "
                         f"the patch's {spec.height}x{spec.width}: {len(filters)} levels need sides divisible by "
                         f"{scale}. Received filters={filters!r}")


def unet_trunk(spec, filters, convs, kernel_size):
    """The uint8 patch input and the normalised encoder-decoder features `[B, T, H, W, filters[0]]` on it,
    options checked: what the enhancer and the segmenter share (the same layers and names)."""
    filters = layers.positive_ints(filters, "filters")
    convs = layers.positive_ints(convs, "convs")[0]
    kernel_size = layers.triple(kernel_size, "kernel_size")
    check_levels(spec, filters)
    layers.require_rgb(spec, "a U-Net (enhancement, segmentation)")
    inputs = layers.patch_input(spec)
    return inputs, unet_body(layers.normalize(spec, inputs), filters, convs, kernel_size)


def unet_body(x, filters, convs: int, kernel_size):
    """Encoder-decoder: `[B, T, H, W, C]` -> `[B, T, H, W, filters[0]]`."""
    def block(x, width, level, side):
        for i in range(convs):
            x = keras.layers.Conv3D(width, kernel_size, padding="same", activation="relu",
                                    name=f"{side}{level}_conv{i + 1}")(x)
        return x

    skips = []
    for level, width in enumerate(filters):
        if level:
            x = keras.layers.Conv3D(width, kernel_size, strides=(1, 2, 2), padding="same", activation="relu",
                                    name=f"down{level}")(x)
        x = block(x, width, level, "enc")
        skips.append(x)
    for level in range(len(filters) - 2, -1, -1):
        x = keras.layers.Conv3DTranspose(filters[level], (1, 2, 2), strides=(1, 2, 2), activation="relu",
                                         name=f"up{level}")(x)
        x = keras.layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = block(x, filters[level], level, "dec")
    return x


def build_unet3d(spec, channels: int = 3, *, filters=(16, 32, 64), convs: int = 2, kernel_size=3, deblock: int = 0,
                 name: str = "unet3d") -> keras.Model:
    """uint8 `[B, T, H, W, C]` -> float32 pixels `[B, T, H, W, channels]` (layer 'pixels').

    `filters[i]` are the channels of level i (level 0 is full resolution);
    `convs` Conv3D layers per level on each side. The patch's height and
    width must be divisible by `2 ** (len(filters) - 1)`. `deblock` B > 0: a deblocking stage on B x B blocks
    after the output, its threshold chosen after training (`layers.ResidualPixels`).
    """
    if channels != spec.channels:
        raise ValueError(f"Invalid value for argument `channels`. Expected the patch's {spec.channels} channels "
                         f"(the output is input + residual). Received channels={channels!r}")
    inputs, x = unet_trunk(spec, filters, convs, kernel_size)
    # Zero-initialised: the untrained model returns its input, and training starts from there.
    # A 1x1x1 projection, not a kernel_size one: the decoder's last convolutions already see the
    # neighbourhood, and with 27x fewer inputs per output the first Adam steps on this layer do not
    # swing the output far enough to silence the ReLUs behind it. Measured on the denoising
    # benchmark's data (250 steps, lr 2e-3; L1 about 17 for the identity): 6.6 with it, 10.1 with
    # a 3x3x3 projection; with filters (32, 64, 128) the 3x3x3 one did not learn at all (16-17).
    residual = keras.layers.Conv3D(channels, 1, kernel_initializer="zeros", name="residual")(x)
    return keras.Model(inputs, layers.enhance_output(inputs, residual, deblock=deblock), name=name)
