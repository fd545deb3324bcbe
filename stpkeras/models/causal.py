"""Model stage: causal temporal layers, and the explicit state that lets them run one frame at a time.

A causal model's output at frame t depends on frames <= t only: every temporal convolution is a
`CausalConv3D` (its temporal padding all on the past side, temporal stride 1), temporal pooling is
none, and the head is a `CausalMean` (the mean of per-frame features over the last `window` frames,
fewer at the start of a clip) read at the last frame (`LastFrame`, the layer named 'features').

Run over a whole clip the layers pad the past with zeros. Inside `streaming(state)` they take their
past from `state` instead and leave their new past in the returned dict, so a clip fed in chunks of any
size (one frame included) gives the same per-frame outputs as the whole clip: MoViNet's stream buffers
(Kondratyuk et al. 2021), carried as explicit tensors so a stateless server can serve a stream. The
state of each layer is named after it (`state_<layer>`; a CausalMean also has `state_<layer>_count`).

Why a context and not extra layer inputs: the same layers, weights and graph serve training, the
whole-clip signature and the stream signature; the context only exists while a stream step is traced.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Optional, Tuple

import keras
from keras import ops

from stpkeras.models.layers import PACKAGE
from stpkeras.signatures import STATE_PREFIX
COUNT_SUFFIX = "_count"

_active = threading.local()   # the stream step being traced on this thread (see `streaming`)


class _Stream:
    def __init__(self, state: Dict[str, object]):
        self.state = dict(state)
        self.new_state: Dict[str, object] = {}

    def take(self, key: str):
        if key not in self.state:
            raise ValueError(f"Invalid stream state. Expected a tensor {key!r}; received {sorted(self.state)}")
        return self.state[key]


@contextlib.contextmanager
def streaming(state: Dict[str, object]) -> Iterator[Dict[str, object]]:
    """Within it, calling a causal model on `[B, n, H, W, C]` new frames continues from `state` (the dict
    `state_spec` describes); the yielded dict holds the new state once the call returns."""
    previous = getattr(_active, "stream", None)
    _active.stream = stream = _Stream(state)
    try:
        yield stream.new_state
    finally:
        _active.stream = previous


def _stream() -> Optional[_Stream]:
    return getattr(_active, "stream", None)


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow's 'same' padding of one axis: (before, after) for an output of ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalConv3D(keras.layers.Conv3D):
    """A Conv3D over `[B, T, H, W, C]` padded 'same' in H and W and only on the past side in T.

    The output at frame t sees frames t-k+1 .. t. The temporal stride is 1 (a strided causal layer would
    answer every other frame); spatial strides are free. Its stream state is its last k-1 input frames,
    `[B, k-1, H, W, C_in]` (none when k = 1).
    """

    def __init__(self, filters, kernel_size, strides=(1, 1, 1), **kwargs):
        kwargs.pop("padding", None)
        super().__init__(filters, kernel_size, strides=strides, padding="valid", **kwargs)
        if self.strides[0] != 1 or self.dilation_rate[0] != 1:
            raise ValueError("Invalid value for argument `strides`. Expected a temporal stride and dilation of 1 "
                             f"(a causal layer answers every frame). Received strides={self.strides}, "
                             f"dilation_rate={self.dilation_rate}")

    @property
    def past(self) -> int:
        return self.kernel_size[0] - 1

    def _spatial_pads(self, shape):
        return [same_padding(int(shape[axis]), self.kernel_size[axis - 1], self.strides[axis - 1])
                for axis in (2, 3)]

    def state_shape(self, input_shape) -> Tuple[int, ...]:
        """The shape of one stream's state, without the batch: `[k-1, H, W, C_in]`."""
        return (self.past, *input_shape[2:])

    def call(self, inputs):
        stream = _stream()
        if self.past:
            if stream is None:
                x = ops.pad(inputs, [(0, 0), (self.past, 0), (0, 0), (0, 0), (0, 0)])
            else:
                key = STATE_PREFIX + self.name
                x = ops.concatenate([ops.cast(stream.take(key), inputs.dtype), inputs], axis=1)
                stream.new_state[key] = ops.cast(x[:, -self.past:], "float32")
        else:
            x = inputs
        (h0, h1), (w0, w1) = self._spatial_pads(inputs.shape)
        x = ops.pad(x, [(0, 0), (0, 0), (h0, h1), (w0, w1), (0, 0)])
        return super().call(x)

    def compute_output_shape(self, input_shape):
        b, t, h, w, _ = input_shape
        out = [None if n is None else -(-n // s) for n, s in ((h, self.strides[1]), (w, self.strides[2]))]
        return (b, t, *out, self.filters)

    def get_config(self):
        config = super().get_config()
        config.pop("padding", None)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalMean(keras.layers.Layer):
    """`[B, T, D]` per-frame features -> `[B, T, D]`: at each frame, the mean over the last `window` frames
    (over the frames so far while fewer than `window` have been seen), in float32.

    Stream state: the last window-1 frames' features `state_<name>` `[B, window-1, D]` (zeros before the
    first frame) and `state_<name>_count` `[B]`, the frames seen (capped at `window`, so an hour of
    frames neither grows the state nor loses precision in a running sum).
    """

    def __init__(self, window: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"Invalid value for argument `window`. Expected a strictly positive integer. "
                             f"Received window={window!r}")
        self.window = window

    def state_shape(self, input_shape) -> Tuple[int, ...]:
        return (self.window - 1, *input_shape[2:])

    def call(self, x):
        x = ops.cast(x, "float32")
        w, n = self.window, ops.shape(x)[1]
        stream = _stream()
        if stream is None:
            past = ops.pad(x[:, :0], [(0, 0), (w - 1, 0), (0, 0)])            # zeros [B, w-1, D]
            seen = ops.zeros_like(x[:, 0, 0])
        else:
            key = STATE_PREFIX + self.name
            past, seen = stream.take(key), stream.take(key + COUNT_SUFFIX)
            past, seen = ops.cast(past, "float32"), ops.cast(seen, "float32")
        full = ops.concatenate([past, x], axis=1)                              # [B, w-1+n, D]
        total = ops.pad(ops.cumsum(full, axis=1), [(0, 0), (1, 0), (0, 0)])    # total[i] = sum(full[:i])
        sums = total[:, w:] - total[:, :-w]                                     # frames i-w+1 .. i, [B, n, D]
        steps = ops.cast(ops.arange(1, n + 1), "float32")
        count = ops.minimum(seen[:, None] + steps[None], float(w))              # [B, n]
        if stream is not None:
            stream.new_state[key] = full[:, ops.shape(full)[1] - (w - 1):]
            stream.new_state[key + COUNT_SUFFIX] = ops.minimum(seen + ops.cast(n, "float32"), float(w))
        return sums / ops.maximum(count, 1.0)[..., None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "window": self.window}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LastFrame(keras.layers.Layer):
    """`[B, T, D]` -> `[B, D]`, the last frame: a causal clip's answer. In a stream step it keeps every new
    frame (`[B, n, D]`), so the head answers once per frame."""

    def call(self, x):
        return x if _stream() is not None else x[:, -1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *input_shape[2:])


@keras.saving.register_keras_serializable(package=PACKAGE)
class FrameFeatures(keras.layers.Layer):
    """`[B, T, H, W, C]` -> `[B, T, D]`: each frame's map flattened (`mean=False`, D = H*W*C) or averaged over
    H and W (`mean=True`, D = C), in float32."""

    def __init__(self, mean: bool = True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mean = bool(mean)

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.mean:
            return ops.mean(x, axis=(2, 3))
        return ops.reshape(x, (ops.shape(x)[0], ops.shape(x)[1], x.shape[2] * x.shape[3] * x.shape[4]))

    def compute_output_shape(self, input_shape):
        b, t, h, w, c = input_shape
        return (b, t, c if self.mean else h * w * c)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean}


def causal_head(x, window: int):
    """`[B, T, H, W, C]` feature maps -> `features` `[B, D]`: per-frame spatial means, their causal window
    mean, the last frame."""
    return causal_features(FrameFeatures(mean=True, name="frame_features")(x), window)


def causal_features(frames, window: int):
    """`[B, T, D]` per-frame features -> the layer 'features' `[B, D]` (the mean of the last `window` frames)."""
    x = CausalMean(window, name="causal_mean")(frames)
    return LastFrame(name="features")(x)


def stateful_layers(model) -> Tuple[keras.layers.Layer, ...]:
    """The layers of `model` that carry stream state (causal convolutions with k > 1, causal means)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, CausalConv3D) and layer.past or isinstance(layer, CausalMean):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(stateful_layers(layer))
    return tuple(found)


def is_causal(model) -> bool:
    """True when `model`'s answer at frame t ignores later frames: it ends in a `CausalMean` head, and every
    convolution with a temporal kernel over 1 is causal."""
    layers = list(_all_layers(model))
    if not any(isinstance(layer, CausalMean) for layer in layers):
        return False
    for layer in layers:
        if isinstance(layer, keras.layers.Conv3D) and not isinstance(layer, CausalConv3D) \
                and (layer.kernel_size[0] > 1 or layer.strides[0] > 1):
            return False
        if isinstance(layer, (keras.layers.MaxPooling3D, keras.layers.AveragePooling3D)) \
                and (layer.pool_size[0] > 1 or layer.strides[0] > 1):
            return False
    return True


def _all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def state_spec(model) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{state name: (shape without the batch, dtype)} of a causal model's stream state; every tensor is
    float32 and its zero is the state before the first frame."""
    spec = {}
    for layer in stateful_layers(model):
        shape = tuple(int(d) for d in layer.state_shape(layer.input.shape))
        spec[STATE_PREFIX + layer.name] = (shape, "float32")
        if isinstance(layer, CausalMean):
            spec[STATE_PREFIX + layer.name + COUNT_SUFFIX] = ((), "float32")
    return spec


def stream_model(model) -> keras.Model:
    """The same layers and weights as the causal `model`, taking any number of frames `uint8 [B, n, H, W, C]`
    (its input's T is None): call it inside `streaming(state)` for one stream step."""
    frames = keras.Input(shape=(None, *model.input.shape[2:]), dtype=model.input.dtype, name="frames")
    return keras.models.clone_model(model, input_tensors=frames, clone_function=lambda layer: layer)
