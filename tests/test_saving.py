"""Saving stage: after `import stpkeras`, `keras.saving.load_model` loads every kind of model the package
writes, in a fresh process, whatever was imported first, with the same outputs and no warnings.
"""

import dataclasses
import os
import importlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import stpkeras
from stpkeras import saving
from tfrecords_tools.spec import PatchSpec

SPEC = PatchSpec(4, 16, 16)
LABELS = ("a", "b", "c")
# task -> the model it is built with (each task's default family)
MODELS = {"classify": "stcnn", "enhance": "dncnn3d", "embed": "stcnn", "segment": "unet3d"}

FRESH_PROCESS = """
import sys, warnings
import numpy as np
warnings.filterwarnings("error", message=".*structure of .inputs.")   # "... doesn't match the expected structure"
order = sys.argv[1]
if order == "stpkeras-first":
    import stpkeras
    import keras
elif order == "keras-first":
    import keras
    import stpkeras
else:  # a stpkeras module that itself imports Keras first
    import stpkeras.models
    import keras
data = dict(np.load(sys.argv[2]))
out = {}
for path in sys.argv[3:]:
    model = keras.saving.load_model(path)
    out[path] = np.asarray(model(data[path], training=False))
    assert model.compiled, path
np.savez(sys.argv[2] + ".out.npz", **out)
"""


def test_every_registered_object_is_listed():
    """`saving.DEFINED_IN` names every Keras object the package registers, with the module that defines it."""
    import keras

    for info in pkgutil.walk_packages(stpkeras.__path__, "stpkeras."):
        if not info.name.startswith(("stpkeras.testing", "stpkeras.cli")):
            importlib.import_module(info.name)
    registered = {name.split(">", 1)[1]: obj.__module__ for name, obj in keras.saving.get_custom_objects().items()
                  if name.startswith(f"{saving.PACKAGE}>")}
    assert registered == saving.DEFINED_IN


def _save_one_per_task(tmp_path):
    from stpkeras.tasks import get_task

    paths, inputs, expected = [], {}, {}
    rng = np.random.default_rng(3)
    for name, model_name in MODELS.items():
        task = get_task(name, {"degrade": ("noise:10",)} if name == "enhance" else None)
        if name == "segment":
            task = dataclasses.replace(task, kind="mask")
        model = task.build_model(model_name, SPEC, LABELS, {})
        model.compile(optimizer="adam", loss=task.loss(), metrics=task.metrics(LABELS))
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        shape = model.input_shape[1:]   # open axes (a fully convolutional enhancer's) at the spec's size
        x = rng.integers(0, 256, size=(2, *(SPEC.shape[k - len(shape)] if d is None else d
                                            for k, d in enumerate(shape))), dtype=np.uint8)
        paths.append(path)
        inputs[path] = x
        expected[path] = np.asarray(model(x, training=False))
    np.savez(tmp_path / "in.npz", **inputs)
    return paths, expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("saving")
    paths, expected = _save_one_per_task(tmp_path)
    return tmp_path, paths, expected


@pytest.mark.parametrize("order", ["stpkeras-first", "keras-first", "stpkeras-module-first"])
def test_keras_load_model_after_import_stpkeras(saved, order):
    tmp_path, paths, expected = saved
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, order, str(tmp_path / "in.npz"), *paths],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(np.load(str(tmp_path / "in.npz") + ".out.npz"))
    for path in paths:
        np.testing.assert_allclose(out[path], expected[path], atol=1e-5, rtol=0)


def test_import_stpkeras_does_not_import_tensorflow():
    code = "import sys, stpkeras\nassert not {'tensorflow', 'keras'} & set(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_import_stpkeras_turns_tensorflows_onednn_kernels_on_unless_the_user_chose():
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads: `import stpkeras` first sets 1 unless it is set
    (on AVX2 CPUs TensorFlow leaves oneDNN off and its Conv3D gradients are 3-50x slower: benchmarks/cpu_kernels.py)."""
    code = ("import stpkeras\nfrom tensorflow.python.util import _pywrap_util_port as port\n"
            "print(port.IsMklEnabled())")
    for setting, expected in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        if setting is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = setting
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == expected, (setting, out.stdout)
    # Too late once TensorFlow has loaded: where it left oneDNN off (this AVX2 CPU), stpkeras says so, once.
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    code = ("import tensorflow\nimport stpkeras\nfrom tensorflow.python.util import _pywrap_util_port as port\n"
            "print(port.IsMklEnabled())")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    off = out.stdout.strip().splitlines()[-1] == "False"
    assert out.stderr.count("Expected `import stpkeras` before TensorFlow") == int(off), out.stderr[-2000:]
