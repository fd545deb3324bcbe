"""stpkeras: videos -> spacetime patches in TFRecords -> tf.data -> Keras 3 Conv3D -> SavedModels.

Importing this package is cheap: TensorFlow and Keras load only when a stage needs them. Once it is
imported, `keras.saving.load_model` loads every model the package writes (see `stpkeras.saving`).
"""

from wrapt import register_post_import_hook

__version__ = "0.1.0"


def _register_keras_objects(keras_module) -> None:
    from stpkeras.saving import register

    register(keras_module)


# Runs now if Keras is already imported, else right after its first import (wrapt comes with TensorFlow).
register_post_import_hook(_register_keras_objects, "keras")


def load(path, **kwargs):
    """A callable predictor for an export (`saved_models/NAME[/VERSION]`), a `.keras` file or a run folder.

    See `stpkeras.predict.load`; calling the predictor with `uint8 [batch, T, H, W, 3]`
    patches returns `logits`, `probabilities`, `class_ids` and `class_names` (a multi-label
    classifier: `logits` and sigmoid `probabilities`; a regressor: `values` and `value_names`).
    """
    from stpkeras.predict import load as _load

    return _load(path, **kwargs)
