"""stpkeras: videos -> spacetime patches in TFRecords -> tf.data -> Keras 3 Conv3D -> SavedModels.

Importing this package is cheap: TensorFlow and Keras load only when a stage needs them. Once it is
imported, `keras.saving.load_model` loads every model the package writes (see `stpkeras.saving`).
"""

import os
import sys
import warnings

from wrapt import register_post_import_hook

__version__ = "0.1.0"


def _onednn_left_off() -> bool:
    """True when TensorFlow loaded before stpkeras, the user did not choose, and TensorFlow left oneDNN off."""
    if "tensorflow" not in sys.modules or "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        return False
    try:
        from tensorflow.python.util import _pywrap_util_port as port
        return bool(port.IsX86Available() and not port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow without these private hooks: say nothing
        return False


# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX. On
# the others (AVX2 machines: most laptops, many cloud CPUs) it falls back to Eigen kernels whose Conv3D
# gradients are 3-50x slower (measured on an AVX2 EPYC: a unet3d segmentation training step 2.46 -> 0.16
# CPU-s; a strided Conv3D's forward+backward 1.56 -> 0.03; docs/benchmarks.md, "CPU kernels"). The
# variable is read once, when TensorFlow loads: import stpkeras first (the CLI does), or set it yourself;
# an explicit TF_ENABLE_ONEDNN_OPTS=0 is respected. GPUs are unaffected.
# Imported after TensorFlow, it is too late in this process: say so once, with the fix (a script that
# imported TensorFlow first trained dncnn3d at 1.1 s a step where `stp train` takes 0.23-0.26 s).
if _onednn_left_off():
    warnings.warn("TensorFlow was imported before stpkeras, so its oneDNN CPU kernels stay off in this process "
                  "(Conv3D training several times slower on this CPU). Expected `import stpkeras` before "
                  "TensorFlow, or TF_ENABLE_ONEDNN_OPTS=1 set before it loads.", RuntimeWarning, stacklevel=2)
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


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
