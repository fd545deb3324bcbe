"""Model stage: `resnet3d`, a 3D ResNet (Hara et al. 2018) of basic blocks with 3x3x3 convolutions.

The residual network is written once here (`residual_network`); `r2plus1d`
passes it a factorised convolution instead of the full 3D one.

`causal=True` (both families): every temporal convolution pads the past only (`causal.CausalConv3D`),
no stage strides in time, and the global average pooling becomes a per-frame spatial mean followed
by the mean over the last `spec.frames` frames (`causal.causal_head`), read at the last frame.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras

from stpkeras.models import causal as causal_layers
from stpkeras.models import layers

# conv(x, filters, kernel (t, h, w), strides (t, h, w), name) -> x, without normalisation or activation.
Conv = Callable[..., keras.KerasTensor]

DEPTHS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WIDTHS = {"small": (32, 64, 128, 256), "full": (64, 128, 256, 512)}


def conv3d(x, filters: int, kernel, strides, name: str, causal: bool = False):
    if causal:
        return causal_layers.CausalConv3D(filters, kernel, strides=strides, use_bias=False, name=name)(x)
    return keras.layers.Conv3D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)


def _bn_relu(x, name: str, relu: bool = True):
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def basic_block(x, filters: int, strides, conv: Conv, name: str, causal: bool = False):
    """Two 3x3x3 convolutions and a shortcut (projected when the shape changes)."""
    shortcut = x
    y = _bn_relu(conv(x, filters, (3, 3, 3), strides, f"{name}_conv1", causal=causal), f"{name}_1")
    y = _bn_relu(conv(y, filters, (3, 3, 3), (1, 1, 1), f"{name}_conv2", causal=causal), f"{name}_2", relu=False)
    if tuple(strides) != (1, 1, 1) or x.shape[-1] != filters:
        shortcut = keras.layers.Conv3D(filters, 1, strides=strides, use_bias=False, name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def residual_network(spec, num_classes: int, *, conv: Conv, widths: Sequence[int], blocks: Sequence[int],
                     stem_kernel, stem_strides, dropout: float, name: str, causal: bool = False) -> keras.Model:
    """Stem -> stages of basic blocks (stride 2 in T, H, W from the second stage) -> pool -> logits."""
    num_classes = layers.check_classes(num_classes)
    widths = layers.positive_ints(widths, "widths")
    blocks = layers.positive_ints(blocks, "blocks")
    if len(blocks) != len(widths):
        raise ValueError(f"Invalid value for argument `blocks`. Expected one block count per width ({len(widths)}). "
                         f"Received blocks={blocks!r}")
    inputs = layers.patch_input(spec)
    x = layers.normalize(spec, inputs)
    x = _bn_relu(conv(x, widths[0], layers.triple(stem_kernel, "stem_kernel"),
                      layers.triple(stem_strides, "stem_strides"), "stem_conv", causal=causal), "stem")
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for i in range(count):
            # 'same' padding: a stride-2 axis of length 1 stays 1, so small patches never vanish.
            # A causal network keeps every frame (a strided causal layer would answer every other one).
            strides = ((1, 2, 2) if causal else (2, 2, 2)) if stage > 0 and i == 0 else (1, 1, 1)
            x = basic_block(x, width, strides, conv, f"stage{stage}_block{i}", causal=causal)
    if causal:
        features = causal_layers.causal_head(x, spec.frames)
    else:
        features = keras.layers.GlobalAveragePooling3D(name="features")(x)
    logits = layers.classifier_head(features, num_classes, layers.check_rate(dropout))
    return keras.Model(inputs, logits, name=name)


def stages(depth: int, width: str, widths=None):
    """(widths, blocks per stage) for a ResNet-`depth` of `width` 'small'/'full', or explicit `widths`."""
    if depth not in DEPTHS:
        raise ValueError(f"Invalid value for argument `depth`. Expected one of {sorted(DEPTHS)}. "
                         f"Received depth={depth!r}")
    if widths is None:
        if width not in WIDTHS:
            raise ValueError(f"Invalid value for argument `width`. Expected one of {sorted(WIDTHS)}. "
                             f"Received width={width!r}")
        widths = WIDTHS[width]
    blocks = DEPTHS[depth][:len(widths)]
    return widths, blocks


def build_resnet3d(spec, num_classes: int, *, depth: int = 18, width: str = "small", widths=None,
                   dropout: float = 0.0, causal: bool = False, name: str = "resnet3d") -> keras.Model:
    """3D ResNet-`depth` (10, 18 or 34); `width` 'small' (32..256) or 'full' (64..512), or explicit `widths`."""
    widths, blocks = stages(depth, width, widths)
    return residual_network(spec, num_classes, conv=conv3d, widths=widths, blocks=blocks, stem_kernel=(3, 7, 7),
                            stem_strides=(1, 2, 2), dropout=dropout, name=name, causal=bool(causal))
