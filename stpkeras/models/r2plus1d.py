"""Model stage: `r2plus1d`, the factorised (2+1)D residual network (Tran et al. 2018).

Each t x d x d convolution becomes a 1 x d x d spatial one and a t x 1 x 1
temporal one, with a ReLU between, and as many intermediate channels as keep
the parameter count of the full 3D convolution (the paper's M_i).
"""

from __future__ import annotations

import keras

from stpkeras.models import causal as causal_layers
from stpkeras.models.resnet3d import residual_network, stages


def intermediate_channels(t: int, d: int, n_in: int, n_out: int) -> int:
    """M_i = floor(t d^2 N_in N_out / (d^2 N_in + t N_out)): the (2+1)D block's parameters match t x d x d."""
    return max(1, (t * d * d * n_in * n_out) // (d * d * n_in + t * n_out))


def conv2plus1d(x, filters: int, kernel, strides, name: str, causal: bool = False):
    t, h, w = kernel
    st, sh, sw = strides
    mid = intermediate_channels(t, max(h, w), int(x.shape[-1]), filters)
    x = keras.layers.Conv3D(mid, (1, h, w), strides=(1, sh, sw), padding="same", use_bias=False,
                            name=f"{name}_spatial")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_mid_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_mid_relu")(x)
    if causal:   # the only layer that mixes frames: it looks back only
        return causal_layers.CausalConv3D(filters, (t, 1, 1), strides=(st, 1, 1), use_bias=False,
                                          name=f"{name}_temporal")(x)
    return keras.layers.Conv3D(filters, (t, 1, 1), strides=(st, 1, 1), padding="same", use_bias=False,
                               name=f"{name}_temporal")(x)


def build_r2plus1d(spec, num_classes: int, *, depth: int = 18, width: str = "small", widths=None,
                   dropout: float = 0.0, causal: bool = False, name: str = "r2plus1d") -> keras.Model:
    """R(2+1)D-`depth` (10, 18 or 34); `width` 'small' (32..256) or 'full' (64..512, the paper's), or `widths`."""
    widths, blocks = stages(depth, width, widths)
    return residual_network(spec, num_classes, conv=conv2plus1d, widths=widths, blocks=blocks,
                            stem_kernel=(3, 7, 7), stem_strides=(1, 2, 2), dropout=dropout, name=name,
                            causal=bool(causal))
