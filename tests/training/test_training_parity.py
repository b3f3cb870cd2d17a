"""The training math against the official PyTorch code: loss, gradients, AdamW, init.

On the golden checkpoints, with dropout and drop path off, the loss and every parameter's
gradient equal those of the official forward (`keras_t2t.reference`, checked against the
official outputs in test_weights), and one AdamW step of the training recipe gives the
parameters that `torch.optim.AdamW` gives with the official parameter groups.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_model

import keras_t2t
from keras_t2t import reference
from keras_t2t import weights as weights_lib
from training import data, optim
from training.config import Config

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

LABELS = np.array([0, 3, 7, 9])
SMOOTHING = 0.1


def _frozen(name):
    """Official tensors with requires_grad=False: the sinusoid table, the performer's w."""
    return name == "pos_embed" or name.endswith(".w")


def _official_parameters(golden):
    state = weights_lib.read_official_checkpoint(golden["checkpoint"])
    return {
        k: torch.tensor(np.asarray(v, np.float32), requires_grad=not _frozen(k))
        for k, v in state.items()
    }


def _official_no_decay(name, parameter):
    """timm's add_weight_decay with the model's no_weight_decay() = {"cls_token"}."""
    return parameter.ndim <= 1 or name.endswith(".bias") or name == "cls_token"


def _soft_targets(classes):
    """timm's smoothed one-hot targets (mixup.py): off = s / K, on = 1 - s + off."""
    off = SMOOTHING / classes
    targets = np.full((len(LABELS), classes), off, np.float32)
    targets[np.arange(len(LABELS)), LABELS] = 1.0 - SMOOTHING + off
    return targets


def _keras_model(golden):
    return tiny_model(
        golden["tokens_type"],
        weights=golden["checkpoint"],
        include_preprocessing=False,
        classifier_activation=None,
    )


def test_label_smoothing_is_timms():
    aug = dataclasses.replace(data.Augmentation.none(), label_smoothing=SMOOTHING)
    augmenter = data.Augmenter(aug, 32, 10)
    _, target = augmenter.image(tf.zeros((40, 40, 3), tf.uint8), tf.constant(int(LABELS[1])))
    np.testing.assert_allclose(target.numpy(), _soft_targets(10)[1], rtol=1e-6)


def test_loss_and_every_gradient_equal_the_official(golden):
    parameters = _official_parameters(golden)
    targets = _soft_targets(golden["num_classes"])
    logits = reference.official_logits(parameters, golden["images_nchw"], num_heads=2)
    # timm's SoftTargetCrossEntropy, the official training loss with smoothing or mixup.
    official_loss = torch.sum(
        -torch.as_tensor(targets) * torch.nn.functional.log_softmax(logits, dim=-1), dim=-1
    ).mean()
    official_loss.backward()
    gradients = {
        k: (p.grad if p.requires_grad else p).detach().numpy() for k, p in parameters.items()
    }
    expected = weights_lib.official_to_state(gradients).arrays  # in the Keras layout

    model = _keras_model(golden)
    with tf.GradientTape() as tape:
        ours = model(golden["images"], training=False)  # dropout and drop path off
        # The trainer's loss (training/trainer.py), on one replica.
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(targets, ours, True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert float(loss) == pytest.approx(float(official_loss), rel=1e-5)
    trainable = {v.path for v in model.trainable_variables}
    assert trainable == {
        weights_lib._keras_path(k)[0] for k, p in parameters.items() if p.requires_grad
    }
    for variable, grad in zip(model.trainable_variables, grads):
        reference_grad = expected[variable.path]
        scale = np.abs(reference_grad).max()
        error = np.abs(grad.numpy() - reference_grad).max()
        assert error <= 1e-5 * scale + 1e-9, (variable.path, error, scale)


def _adamw_config():
    return Config(
        batch_size=512,
        learning_rate=1e-3,
        weight_decay=0.05,
        epochs=10,
        warmup_epochs=0,
        cooldown_epochs=0,
        warmup_lr=1e-6,
        min_lr=1e-5,
        mixed_precision="float32",
    )


def test_adamw_steps_equal_torch_with_the_official_parameter_groups(golden):
    parameters = _official_parameters(golden)
    trainable = {k: p for k, p in parameters.items() if p.requires_grad}
    decay = [p for k, p in trainable.items() if not _official_no_decay(k, p)]
    no_decay = [p for k, p in trainable.items() if _official_no_decay(k, p)]
    config = _adamw_config()
    official = torch.optim.AdamW(
        [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=0.05)],
        lr=config.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    model = _keras_model(golden)
    optimizer, schedule = optim.build_optimizer(config, 100, model)
    variables = {v.path: v for v in model.trainable_variables}
    rng = np.random.default_rng(0)
    for step in range(3):
        # Gradients over many magnitudes, 1e-10 to 1, where epsilon's placement shows.
        grads = {
            k: (rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-10, 0, p.shape)).astype(
                np.float32
            )
            for k, p in trainable.items()
        }
        lr = float(schedule(step))
        for group in official.param_groups:
            group["lr"] = lr
        for k, p in trainable.items():
            p.grad = torch.as_tensor(grads[k])
        official.step()
        full = {k: grads.get(k, parameters[k].detach().numpy()) for k in parameters}
        keras_grads = weights_lib.official_to_state(full).arrays
        optimizer.apply_gradients([(keras_grads[path], v) for path, v in variables.items()])
    after = weights_lib.official_to_state({k: p.detach().numpy() for k, p in parameters.items()})
    for path, variable in variables.items():
        np.testing.assert_allclose(
            variable.numpy(), after.arrays[path], rtol=1e-5, atol=1e-7, err_msg=path
        )


def test_weight_decay_groups_are_the_officials(golden):
    """Zero gradients move no weight through Adam (0 / (0 + eps)), so one step shows which
    weights are decayed: exactly those of the official decay group, by (1 - lr * wd)."""
    parameters = _official_parameters(golden)
    model = _keras_model(golden)
    config = _adamw_config()
    optimizer, _ = optim.build_optimizer(config, 100, model)
    before = {v.path: v.numpy() for v in model.trainable_variables}
    optimizer.apply_gradients(
        [(np.zeros(v.shape, np.float32), v) for v in model.trainable_variables]
    )
    decayed = set()
    for v in model.trainable_variables:
        if not np.array_equal(v.numpy(), before[v.path]):
            factor = 1 - config.learning_rate * config.weight_decay
            np.testing.assert_allclose(v.numpy(), before[v.path] * factor, rtol=1e-6)
            decayed.add(v.path)
    official = {
        weights_lib._keras_path(k)[0]
        for k, p in parameters.items()
        if p.requires_grad and not _official_no_decay(k, p)
    }
    assert decayed == official
    assert any(path.startswith("tokens_to_token/") for path in decayed)


def test_initialization_is_the_officials():
    """timm's trunc_normal_(std=.02) cuts at +-2 absolute, so it is a normal of std 0.02,
    tails included (4.55% of draws beyond 2 std); LayerNorm 1 and 0, biases 0."""
    model = keras_t2t.T2TViT14(input_shape=(32, 32, 3), classes=1000)
    values = {v.path: v.numpy() for v in model.weights}
    for path in (
        "blocks_0/attn/qkv/kernel",
        "blocks_3/mlp/fc1/kernel",
        "head/kernel",
        "tokens_to_token/attention2/kqv/kernel",
    ):
        kernel = values[path].ravel()
        assert np.std(kernel) == pytest.approx(0.02, rel=0.03), path
        assert np.mean(np.abs(kernel) > 0.04) == pytest.approx(0.0455, abs=0.006), path
    assert 0.01 < np.std(values["cls_token/token"]) < 0.03
    for path, value in values.items():
        if path.endswith(("/bias", "/beta")):
            assert np.all(value == 0), path
        if path.endswith("/gamma"):
            assert np.all(value == 1), path
