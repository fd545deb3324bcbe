"""Tests of stpkeras.setup: every task through both training loops, Keras `fit` in this process and the custom
loop on two workers on 127.0.0.1 (`stp train --strategy multiworker`), from one set-up; the task's defaults
without the CLI; options a loop cannot honour refused before anything runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from converted import write_converted
from stpkeras.augment import COPY_AUGMENT
from stpkeras import setup
from stpkeras.setup import TrainConfig
from test_multiworker import train_on_workers

SHAPE = (4, 16, 16, 3)   # 16 x 16: SSIM's window is 11 pixels wide
NOISE = 25.0   # enhance's degradation, noise:25 (Gaussian sigma, 0-255 units)


def _items(n, rng):
    """Patches a small model learns from in a few steps: a flat patch whose brightness tells its class
    (3 classes, 70 apart), with a brighter part right of a random column (the mask, class 1)."""
    items, masks = [], []
    for i in range(n):
        label = (i % 6) % 3
        column = int(rng.integers(4, 13))
        patch = np.full(SHAPE, 30 + 70 * label + rng.integers(-10, 11), np.int32)
        mask = np.zeros(SHAPE[:3], np.uint8)
        mask[:, :, column:] = 1
        patch[:, :, column:] += 50
        items.append((patch.astype(np.uint8), label, f"v{i % 6}.mp4"))
        masks.append(mask)
    return items, masks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tasks") / "data")
    rng = np.random.default_rng(0)
    (train, train_masks), (val, val_masks) = _items(64, rng), _items(16, rng)
    # One shard: fewer files than workers, so the custom loop's workers split the records.
    write_converted(root, {"train": train, "val": val}, ("a", "b", "c"), shards=1,
                    masks={"train": train_masks, "val": val_masks}, mask_classes=2)
    # Multi-label and regression targets of the same patches: classes "dark" (class a), "lit" (b or c),
    # "bright" (c); values: the brightness level (0, 1, 2) and the patch's mean pixel value.
    targets = str(tmp_path_factory.mktemp("targets") / "data")
    rng = np.random.default_rng(0)
    (train, train_masks), (val, val_masks) = _items(64, rng), _items(16, rng)
    split_items = {"train": train, "val": val}
    write_converted(targets, {n: [(p, -1, v) for p, _, v in items] for n, items in split_items.items()},
                    ("dark", "lit", "bright"), shards=1,
                    multi_hot={n: [[label == 0, label >= 1, label == 2] for _, label, _ in items]
                               for n, items in split_items.items()},
                    values={n: [[label, float(p.mean())] for p, label, _ in items] for n, items in split_items.items()},
                    value_names=("level", "brightness"))
    return root, _noisy_psnr(np.stack([p for p, _, _ in val])), targets


def _noisy_psnr(clean):
    """The mean PSNR of `clean` patches with enhance's noise, against them: what the identity scores (about
    20.4 dB: 20.17 for sigma 25, a little more where the noise clips at 0 and 255)."""
    clean = clean.astype(np.float64)
    noisy = np.clip(np.round(clean + np.random.default_rng(1).normal(0, NOISE, clean.shape)), 0, 255)
    mse = ((noisy - clean) ** 2).reshape(len(clean), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))


# Declarative: per task, its options, model options, the defaults it resolves to, and what one short
# epoch must reach on validation, given the noisy input's PSNR (a trivial model's value in the comment).
CASES = {
    # classify also runs the options the custom loop once ignored in silence.
    "classify": dict(task_options={}, model_options={"filters": 8}, lr=1e-2,
                     flags={"class_weight": True, "mixed_precision": True, "jit": True},
                     model="stcnn", augment=["crop", "color"],
                     recorded={"multi_label": None, "flip_labels": [], "tta_flip_labels": []},
                     # Two epochs: after one (16 steps of 4 in bfloat16, colour jitter on a brightness-coded
                     # class) a run once stopped at 0.44 on validation.
                     epochs=2, check=lambda m, noisy: m["val_accuracy"] > 0.5),           # chance 1/3
    # Multi-label by the data's label_mode; the PR-AUC over 3 classes of 1/3, 2/3, 1/3 positives: a
    # constant scores their shares, 0.44 on average.
    "classify-multi": dict(task="classify", data="targets", task_options={}, model_options={"filters": 8}, lr=1e-2,
                           flags={"mixed_precision": True, "jit": True}, model="stcnn", augment=["crop", "color"],
                           recorded={"multi_label": None, "flip_labels": [], "tta_flip_labels": []},
                           labels=["dark", "lit", "bright"],
                           options={"multi_label": True},
                           check=lambda m, noisy: m["val_pr_auc"] > 0.7),
    # Huber loss in standard deviations: predicting the mean scores about 0.48 (levels at -1.22, 0, 1.22).
    "regress": dict(data="targets", task_options={"value_loss": "huber"}, model_options={"filters": 8}, lr=1e-2,
                    flags={"mixed_precision": True, "jit": True}, model="stcnn", augment=["flip"],
                    recorded={"value_loss": "huber"}, labels=["level", "brightness"],
                    # Two epochs: after one (16 steps of 4 in bfloat16 under XLA) a CI run once stopped at 0.245;
                    # 28 runs outside CI ended at 0.033-0.059 after one and 0.011-0.019 after two.
                    epochs=2, check=lambda m, noisy: m["val_loss"] < 0.2),
    "enhance": dict(task_options={"degrade": ["noise:25"]}, model_options={"filters": 8, "depth": 3}, lr=3e-3,
                    model="dncnn3d", augment=["flip"],
                    recorded={"crop": 0, "degrade": ["noise:25"], "pixel_loss": "l1", "soften": None},
                    options={"soften": 0.5},   # the task's default on self-supervised rgb data, in run.json
                    check=lambda m, noisy: m["val_psnr"] > noisy + 0.2),      # the identity: the noisy input
    "embed": dict(task_options={}, model_options={"filters": 8}, lr=1e-2,
                  model="stcnn", augment=list(COPY_AUGMENT), recorded={"temperature": 0.1},
                  check=lambda m, noisy: m["val_pair_accuracy"] > 2 / 7),   # chance 1/7 (a batch of 4 pairs)
    # The zero prediction scores about 1 on tubelets that are not flat and 0 on flat ones (their target is 0).
    "pretrain": dict(task_options={}, model_options={"tubelet": [2, 4, 4], "dim": 16, "depth": 1, "heads": 2,
                                                     "mlp_dim": 32}, lr=1e-2,
                     model="vivit", augment=["flip", "crop"],
                     recorded={"decoder_depth": 1, "decoder_dim": 64, "mask_ratio": 0.9},
                     check=lambda m, noisy: m["val_loss"] < 0.5),
    "segment": dict(task_options={}, model_options={"filters": [4, 8]}, lr=1e-2,
                    model="unet3d", augment=["crop", "color"], recorded={"dice": 1.0},
                    check=lambda m, noisy: m["val_mean_iou"] > 0.4),          # all background: about 0.25
    # The shake's motion of the step edge: whether the model learns is checked in test_stabilize.py; here
    # that both loops train the same softmotion from the same shaken elements (a zero estimate errs ~0.3 px).
    "stabilize": dict(task_options={}, model_options={"features": 4}, lr=1e-2,
                      model="softmotion", augment=["flip", "color"],
                      recorded={"degrees": 1.5, "shift": 0.5, "zoom_percent": 2.0},
                      check=lambda m, noisy: m["val_motion_error"] < 1.0),
}
COMMON = dict(epochs=1, batch_size=4, seed=0, verbose=0, shuffle_buffer=64)


def _epochs(case):
    return case.get("epochs", COMMON["epochs"])


def _cli_args(case):
    args = ["--task", case["task"], "--lr", str(case["lr"])]
    for key, value in case["model_options"].items():
        args += ["--model-arg", f"{key}={json.dumps(value)}"]
    for value in case["task_options"].get("degrade", []):
        args += ["--degrade", value]
    if "value_loss" in case["task_options"]:
        args += ["--loss", case["task_options"]["value_loss"]]
    args += ["--" + flag.replace("_", "-") for flag in case.get("flags", {})]
    return args + ["--epochs", str(_epochs(case)), "--batch-size", str(COMMON["batch_size"]),
                   "--seed", "0", "--verbose", "0", "--shuffle-buffer", str(COMMON["shuffle_buffer"])]


def _check(run, case, noisy_psnr):
    assert run["status"] == "done" and run["task"] == case["task"] and run["metrics"]["epochs"] == _epochs(case)
    final = run["metrics"]["final"]
    assert all(math.isfinite(v) for v in final.values()), final
    assert case["check"](final, noisy_psnr), (case["task"], run["strategy"]["loop"], final)
    # The task's defaults, resolved and recorded, with the task's options.
    assert run["model"] == run["config"]["model"] == case["model"]
    assert run["config"]["augment"] == case["augment"] and run["config"]["task_options"] == case["recorded"]
    # What the data set: multi-label outputs, the values' names and scale.
    assert {k: run["task_options"][k] for k in case.get("options", {})} == case.get("options", {})
    if "labels" in case:
        assert run["labels"] == case["labels"]
    # Asked for, bfloat16 on CPUs; not said, bfloat16 for enhance where this CPU computes it natively, float32
    # elsewhere.
    native = "mixed_bfloat16" if setup.native_bfloat16() and case["task"] == "enhance" else "float32"
    assert run["precision"] == ("mixed_bfloat16" if case.get("flags", {}).get("mixed_precision") else native)


@pytest.mark.parametrize("task", sorted(CASES))
def test_every_task_trains_through_both_loops_from_one_set_up(task, data, tmp_path):
    from stpkeras.train import train

    plain, noisy_psnr, targets = data
    case = dict(CASES[task])
    task = case.setdefault("task", task)
    data = targets if case.get("data") == "targets" else plain
    train(TrainConfig(data=data, out=str(tmp_path / "fit"), task=task, lr=case["lr"],
                      task_options=tuple((k, tuple(v) if isinstance(v, list) else v)
                                         for k, v in case["task_options"].items()),
                      model_options=tuple((k, tuple(v) if isinstance(v, list) else v)
                                          for k, v in case["model_options"].items()),
                      **case.get("flags", {}), **{**COMMON, "epochs": _epochs(case)}),
          echo=lambda s: None)
    train_on_workers(data, tmp_path / "custom", _cli_args(case))
    fit_run, custom_run = (json.load(open(tmp_path / loop / "run.json")) for loop in ("fit", "custom"))

    assert fit_run["strategy"]["loop"] == "keras fit" and custom_run["strategy"]["workers"] == 2
    for run in (fit_run, custom_run):
        _check(run, case, noisy_psnr)
    # One set-up: the loops' run.json agree on everything but where they ran.
    differ = ("out", "strategy")
    assert {k: v for k, v in fit_run["config"].items() if k not in differ} == \
           {k: v for k, v in custom_run["config"].items() if k not in differ}
    for key in ("task", "model", "labels", "spec", "splits", "manifest_sha256", "params"):
        assert fit_run[key] == custom_run[key], key


@pytest.mark.parametrize("task, model, augment", [("classify", "stcnn", ("crop", "color")),
                                                  ("regress", "stcnn", ("flip",)),
                                                  ("enhance", "dncnn3d", ("flip",)),
                                                  ("embed", "stcnn", COPY_AUGMENT),
                                                  ("pretrain", "vivit", ("flip", "crop")),
                                                  ("segment", "unet3d", ("crop", "color")),
                                                  ("stabilize", "softmotion", ("flip", "color"))])
def test_a_config_from_python_takes_the_task_defaults(task, model, augment):
    config = TrainConfig(data="data", out="run", task=task)
    assert (config.model, config.augment) == (model, augment)
    # Enhancement's recipe: small batches at a higher rate (more steps in a time budget).
    assert (config.batch_size, config.lr) == ((8, 2e-3) if task == "enhance" else (32, 1e-3))
    # What is given wins; options are completed with the task's defaults.
    config = TrainConfig(data="data", out="run", task="enhance", model="unet3d", augment="none",
                         task_options=(("degrade", ("noise:25",)),))
    assert (config.model, config.augment) == ("unet3d", ())
    assert config.to_dict()["task_options"] == {"crop": 0, "degrade": ["noise:25"], "pixel_loss": "l1",
                                                "soften": None}


def test_mixed_precision_is_bfloat16_where_the_cpu_computes_it_natively(tmp_path, monkeypatch):
    """Not said (None): bfloat16 for a task that measured it (enhance: a dncnn3d step took 0.26x the CPU of
    float32 on an AMX CPU, docs/benchmarks.md) on a CPU with AMX or AVX-512 BF16 and no GPU, float32 elsewhere;
    asked for: float16 on GPUs, bfloat16 on CPUs; refused: float32."""
    cpuinfo = tmp_path / "cpuinfo"
    for flags, expected in (("fpu avx2 avx512f amx_tile amx_bf16 avx512_bf16", "amx_bf16"),
                            ("fpu avx2 avx512f avx512_bf16", "avx512_bf16"), ("fpu sse4_2 avx2 fma", None)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert setup.native_bfloat16(str(cpuinfo)) == expected
    assert setup.native_bfloat16(str(tmp_path / "absent")) is None     # no /proc (macOS, Windows): float32
    for native, gpu, asked, policy in ((True, False, None, "mixed_bfloat16"), (False, False, None, None),
                                       (True, True, None, None), (False, False, True, "mixed_bfloat16"),
                                       (True, True, True, "mixed_float16"), (True, False, False, None)):
        monkeypatch.setattr(setup, "native_bfloat16", lambda native=native: "amx_bf16" if native else None)
        assert setup.mixed_policy(asked, gpu) == policy, (native, gpu, asked)
        assert setup.mixed_policy(asked, gpu, auto=False) == (None if asked is None else policy)
    from stpkeras.tasks import get_task
    assert [type(get_task(name, {})).AUTO_BFLOAT16 for name in ("enhance", "classify", "segment")] == [True, False,
                                                                                                      False]


def test_a_short_cpu_budget_trains_enhance_on_crops_and_says_so(monkeypatch):
    """15 minutes on 2 CPU cores: the default 5-layer dncnn3d on whole 64x64 patches at the task's lr ended below
    or just above a Gaussian blur, on 32x32 crops at lr 1e-3 well above it (docs/benchmarks.md): a timed enhance
    run on CPUs alone takes the latter, and says so; anything the user set about the model, a GPU, or a longer
    budget leaves the task's defaults, and a crop the user gives wins over the recipe's."""
    import stpkeras.setup as setup
    monkeypatch.setattr(setup, "cpu_cores", lambda: 2)
    monkeypatch.setattr(setup, "has_gpu", lambda: False)
    monkeypatch.setattr(setup, "native_bfloat16", lambda: "amx_bf16")

    def make(**kw):
        return TrainConfig(data="data", out="run", task="enhance", **kw)

    config = make(minutes=15)
    assert (config.model, dict(config.model_options), config.lr, config.batch_size) == ("dncnn3d", {}, 1e-3, 8)
    assert dict(config.task_options)["crop"] == 32
    assert config.recipe.startswith("CPU-budget defaults: crop=32, lr 0.001 (no GPU, 15 min x 2 cores <= 120")
    assert config.to_dict()["recipe"] == config.recipe   # run.json records why
    # In float32 (asked for, or a CPU without bfloat16 units) the recipe trains batches of 2, and says so; a batch
    # size the user gives wins, and bfloat16 asked for keeps the task's 8.
    for native in (None, "amx_bf16"):   # a CPU without bfloat16 units; float32 asked for (and amx_bf16 again after)
        monkeypatch.setattr(setup, "native_bfloat16", lambda: native)
        config = make(minutes=15, mixed_precision=None if native is None else False)
        assert (config.batch_size, config.lr, dict(config.task_options)["crop"]) == (2, 1e-3, 32)
        assert config.recipe.startswith("CPU-budget defaults: crop=32, batch size 2 in float32, lr 0.001 (no GPU")
    config = make(minutes=15, batch_size=16)
    assert config.batch_size == 16 and config.recipe.startswith("CPU-budget defaults: crop=32, lr 0.001 (no GPU")
    assert make(minutes=15, mixed_precision=True).batch_size == 8
    assert make(minutes=61).batch_size == 8 and make(minutes=15, lr=2e-3).batch_size == 8   # no recipe: the task's
    config = make(minutes=15, task_options=(("crop", 0),))
    assert dict(config.task_options)["crop"] == 0 and config.lr == 1e-3
    assert config.recipe.startswith("CPU-budget defaults: lr 0.001 (no GPU")
    assert make(minutes=60).recipe is not None and make(minutes=61).recipe is None   # 60 x 2 cores = 120
    for given in (dict(lr=2e-3), dict(model="dncnn3d"), dict(model_options=(("depth", 5),)),
                  dict(init_from="runs/earlier"), dict(strategy="multiworker"), {}):
        config = make(**given, minutes=15) if given else make()   # {}: no budget, epochs
        assert config.recipe is None, given
        assert dict(config.task_options)["crop"] == 0 and config.lr == given.get("lr", 2e-3), given
    assert TrainConfig(data="data", out="run", task="classify", minutes=15).recipe is None   # no such recipe
    monkeypatch.setattr(setup, "has_gpu", lambda: True)
    assert make(minutes=15).recipe is None and make(minutes=15).lr == 2e-3


def test_options_a_loop_cannot_honour_are_refused_with_the_reason(data, tmp_path, cli):
    data, targets = data[0], data[2]
    with pytest.raises(ValueError, match=r"data_service.*strategy='multiworker'"):
        TrainConfig(data=data, out=str(tmp_path / "a"), strategy="multiworker", data_service="grpc://localhost:1")
    with pytest.raises(ValueError, match=r"minutes.*data_service"):
        TrainConfig(data=data, out=str(tmp_path / "a"), minutes=5, data_service="grpc://localhost:1")
    with pytest.raises(ValueError, match="Received minutes=0"):
        TrainConfig(data=data, out=str(tmp_path / "a"), minutes=0)
    with pytest.raises(ValueError, match="trace_dir"):
        TrainConfig(data=data, out=str(tmp_path / "a"), trace_dir=str(tmp_path / "trace"))
    with pytest.raises(ValueError, match=r"Invalid options \['degrade'\] for task 'embed'"):
        TrainConfig(data=data, out=str(tmp_path / "a"), task="embed", task_options=(("degrade", ("noise:25",)),))
    r = cli("train", data, "--out", str(tmp_path / "b"), "--strategy", "multiworker",
            "--data-service", "grpc://localhost:1")
    assert r.exit_code == 2 and "data_service" in r.output and "multiworker" in r.output
    # Class weights exist for classes only; refused before the run folder is written.
    r = cli("train", data, "--out", str(tmp_path / "c"), "--task", "segment", "--class-weight")
    assert r.exit_code == 2 and "--class-weight: task 'segment'" in r.output  # bad usage (README: exit codes)
    assert not (tmp_path / "c" / "run.json").exists()
    # Multi-label data has no class per patch to weight; values need data with values; options of other tasks.
    r = cli("train", targets, "--out", str(tmp_path / "d"), "--class-weight")
    assert r.exit_code == 2 and "multi-label outputs have none" in r.output
    r = cli("train", data, "--out", str(tmp_path / "e"), "--task", "regress")
    assert r.exit_code == 2 and "task regress needs records with values" in r.output
    r = cli("train", data, "--out", str(tmp_path / "f"), "--task", "regress", "--loss", "l1")
    assert r.exit_code == 2 and "mse or huber with --task regress" in r.output
    r = cli("train", data, "--out", str(tmp_path / "g"), "--task", "regress", "--multi-label")
    assert r.exit_code == 2 and "--multi-label is an option of --task classify" in r.output
    assert not any((tmp_path / n / "run.json").exists() for n in "defg")
