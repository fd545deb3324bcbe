"""stpkeras: videos -> spacetime patches in TFRecords -> tf.data -> Keras 3 Conv3D -> SavedModels.

Importing this package is cheap: TensorFlow and Keras load only when a stage needs them.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A callable predictor for an export (`saved_models/NAME[/VERSION]`), a `.keras` file or a run folder.

    See `stpkeras.predict.load`; calling the predictor with `uint8 [batch, T, H, W, 3]`
    patches returns `logits`, `probabilities`, `class_ids` and `class_names`.
    """
    from stpkeras.predict import load as _load

    return _load(path, **kwargs)
