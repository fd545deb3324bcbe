"""Tests of `--init-from` (stpkeras.finetune): the backbone starts from the earlier run's weights (not a fresh
draw), the head is new; a frozen backbone stays bit-equal through training while the head learns; the
backbone's learning-rate factors scale its steps; what cannot apply is refused with the reason."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from converted import write_converted
from stpkeras.finetune import ScaledAdamW, leaf_layers, lr_scales
from stpkeras.run_folder import RunError
from stpkeras.setup import TrainConfig, prepare_run
from stpkeras.train import fit, train
from test_pretrain import SHAPE, TINY, moving_bars
from test_multiworker import train_on_workers


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Bars moving right (class a) or left (class b)."""
    root = str(tmp_path_factory.mktemp("finetune") / "data")
    items = []
    for i, (patch, _, video) in enumerate(moving_bars(48, 2)):
        items.append((patch if i % 2 == 0 else patch[::-1].copy(), i % 2, video))
    write_converted(root, {"train": items[:40], "val": items[40:]}, ("a", "b"), shards=1)
    return root


@pytest.fixture(scope="module")
def pretrained(labelled, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "pretrain")
    train(TrainConfig.tiny(labelled, out, task="pretrain", model="vivit", model_options=TINY, epochs=1, augment=()),
          echo=lambda s: None)
    return out


def _weights(model, names):
    layers = {layer.name: layer for layer in leaf_layers(model)}
    return {name: [np.array(w) for w in layers[name].get_weights()] for name in names}


def test_init_from_a_pretraining_run_takes_the_encoder_and_a_frozen_backbone_stays_frozen(labelled, pretrained,
                                                                                           tmp_path):
    source = keras.saving.load_model(f"{pretrained}/best.keras")
    run = prepare_run(TrainConfig.tiny(labelled, str(tmp_path / "probe"), model="vivit", model_options=TINY,
                                       init_from=pretrained, freeze_backbone=True, lr=1e-2))
    taken = run.transfer.taken
    assert set(taken) == {"tubelets", "position", "encoder_ln"} | {f"encoder0_{n}" for n in
                                                                    ("ln1", "attention", "ln2", "mlp1", "mlp2")}
    assert run.transfer.new == ("logits",)
    # Loaded, not drawn afresh: every taken weight equals the pretrained one before any step.
    before = _weights(run.model, taken)
    for name, values in _weights(source, taken).items():
        for got, want in zip(before[name], values):
            np.testing.assert_array_equal(got, want)
    head = _weights(run.model, ["logits"])["logits"]
    record = fit(run, echo=lambda s: None)
    assert record["init_from"]["frozen"] and record["init_from"]["taken"] == list(taken)
    assert record["metrics"]["optimizer_steps"] == 2 * 5
    after = _weights(keras.saving.load_model(tmp_path / "probe" / "last.keras", compile=False), taken + ("logits",))
    for name in taken:
        for got, want in zip(after[name], before[name]):
            np.testing.assert_array_equal(got, want)          # bit-equal
    assert not np.array_equal(after["logits"][0], head[0])    # while the head learnt
    assert json.load(open(tmp_path / "probe" / "run.json"))["init_from"]["new"] == ["logits"]


def test_init_from_an_embed_run_fills_a_classifier_of_the_same_family(labelled, tmp_path):
    train(TrainConfig.tiny(labelled, str(tmp_path / "embed"), task="embed", epochs=1), echo=lambda s: None)
    run = prepare_run(TrainConfig.tiny(labelled, str(tmp_path / "cls"), init_from=str(tmp_path / "embed" /
                                                                                       "best.keras")))
    assert run.transfer.taken == ("conv",) and run.transfer.new == ("logits",)
    embed = keras.saving.load_model(tmp_path / "embed" / "best.keras")
    np.testing.assert_array_equal(_weights(run.model, ["conv"])["conv"][0], _weights(embed, ["conv"])["conv"][0])


def test_scaled_steps_layer_decay_and_the_optimizer_that_applies_them():
    scales = lr_scales(["tubelets", "position", "encoder0_mlp1", "encoder1_ln1", "encoder_ln"], 0.5, 0.5)
    # depth 2: the embedding 3 steps below the head, block 0 two, block 1 one, the final norm none.
    assert scales == {"tubelets": 0.0625, "position": 0.0625, "encoder0_mlp1": 0.125, "encoder1_ln1": 0.25,
                      "encoder_ln": 0.5}
    with pytest.raises(RunError, match="--layer-decay: the backbone has no transformer blocks"):
        lr_scales(["conv"], 1.0, 0.5)
    # Adam's first step moves every weight by about the learning rate: the scaled layer moves 1/1000 of it.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(keras.layers.Dense(4, name="body")(inputs)))
    start = [np.array(w) for w in model.get_weights()]
    optimizer = ScaledAdamW(0.01, weight_decay=0.0, lr_scales={v.path: 1e-3 for v in
                                                               model.get_layer("body").trainable_weights})
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(np.ones((8, 4)), np.full((8, 1), 5.0))
    body, head = (np.abs(np.array(model.get_layer(n).kernel) - start[i]).max() for n, i in (("body", 0), ("head", 2)))
    assert head == pytest.approx(0.01, rel=1e-3) and body == pytest.approx(1e-5, rel=1e-2)
    assert ScaledAdamW.from_config(optimizer.get_config()).lr_scales == optimizer.lr_scales


def test_what_cannot_apply_is_refused(labelled, pretrained, tmp_path):
    with pytest.raises(ValueError, match="freeze_backbone.*without init_from"):
        TrainConfig(data=labelled, out=str(tmp_path / "a"), freeze_backbone=True)
    with pytest.raises(ValueError, match="backbone_lr_scale.*with freeze_backbone"):
        TrainConfig(data=labelled, out=str(tmp_path / "a"), init_from=pretrained, freeze_backbone=True,
                    backbone_lr_scale=0.1)
    with pytest.raises(RunError, match="none of its layers matches"):
        prepare_run(TrainConfig.tiny(labelled, str(tmp_path / "b"), init_from=pretrained))   # stcnn from a vivit
    with pytest.raises(RunError, match="expected a run folder"):
        prepare_run(TrainConfig.tiny(labelled, str(tmp_path / "c"), init_from=str(tmp_path)))


def test_the_multiworker_loop_keeps_a_frozen_backbone_frozen(labelled, pretrained, tmp_path):
    train_on_workers(labelled, tmp_path / "mw", ["--model", "vivit", "--init-from", pretrained, "--freeze-backbone",
                                                 "--epochs", "1", "--batch-size", "4", "--seed", "0", "--verbose", "0",
                                                 "--augment", "none", "--lr", "0.01"]
                     + [a for k, v in TINY for a in ("--model-arg", f"{k}={json.dumps(v)}")])
    source = keras.saving.load_model(f"{pretrained}/best.keras")
    after = keras.saving.load_model(tmp_path / "mw" / "last.keras", compile=False)
    record = json.load(open(tmp_path / "mw" / "run.json"))
    assert record["init_from"]["frozen"] and record["strategy"]["workers"] == 2
    taken = tuple(record["init_from"]["taken"])
    for name, values in _weights(source, taken).items():
        for got, want in zip(_weights(after, [name])[name], values):
            np.testing.assert_array_equal(got, want)
    assert SHAPE == tuple(after.input.shape[1:])
