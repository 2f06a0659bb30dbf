"""The online probe on un-augmented images (probe.clean_every): what it trains on, that the
encoder never learns from it, and the reference's probe on the views as the option."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import pretrain
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.data import augment, fashion_mnist, views

BATCH = 8


def setup(clean_every):
    config = pretrain_fashion_mnist.get_config("tiny")
    config.probe.clean_every = clean_every
    # The probe is the same on any backbone; the 4-conv convnet compiles in a fraction of the time.
    config.model.backbone, config.model.depth = "convnet", 4
    model = pretrain.make_model(config, 10)
    state = pretrain.init_state(model, config, 1, 0.1)
    images, labels = fashion_mnist.load("test")
    batch = {"image": jnp.asarray(images[:BATCH].reshape(BATCH, 28, 28, 1)),
             "label": jnp.asarray(labels[:BATCH], jnp.int32)}  # fmt: skip
    return config, model, state, batch


def gradients(config, model, state, batch, use_probe_batch):
    """One replica's gradients as the train step computes them (axis named as in the step)."""
    view_gradients = pretrain.make_view_gradient_fn(model, config)

    def fn(state, batch):
        view_a, view_b = views.contrastive_views(config, state.step, batch["image"])
        probe = (
            views.probe_inputs(config, batch["image"], batch["label"]) if use_probe_batch else None
        )
        return view_gradients(state, view_a, view_b, batch["label"], probe)

    mapped = jax.pmap(fn, axis_name="data")
    expand = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
    return jax.tree.map(lambda x: x[0], mapped(expand(state), expand(batch)))


def test_probe_inputs_are_the_evaluation_view_of_every_kth_row_on_any_device_count():
    config, _, _, batch = setup(4)
    images, labels = views.probe_inputs(config, batch["image"], batch["label"])
    assert images.shape == (2, 28, 28, 1)  # rows 0 and 4 of 8
    np.testing.assert_array_equal(labels, batch["label"][::4])
    expected = augment.eval_preprocess(batch["image"][::4], out_size=28)
    np.testing.assert_allclose(images, expected)
    # Two replicas of 4 rows each take the same global rows as one device with all 8.
    halves = [views.probe_inputs(config, batch["image"][i : i + 4], batch["label"][i : i + 4])
              for i in (0, 4)]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves]), images)
    np.testing.assert_array_equal(np.concatenate([h[1] for h in halves]), labels)


def test_clean_probe_trains_on_inference_mode_features_and_leaves_the_encoder_alone():
    config, model, state, batch = setup(2)
    # Running statistics of the probe's input BatchNorm away from (0, 1), so that they count.
    rng = np.random.default_rng(0)
    norm = {name: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
            for name, x in state.batch_stats["classifier_norm"].items()}  # fmt: skip
    state = state.replace(batch_stats={**state.batch_stats, "classifier_norm": norm})
    with_clean, aux, _ = gradients(config, model, state, batch, True)
    with_views, _, _ = gradients(config, model, state, batch, False)
    # The encoder and head learn only from NT-Xent: the same with either probe input, up to the
    # float32 rounding of two different programs (<= 4e-6 of a leaf's largest value; a probe
    # gradient leaking in differs by ~8e-3).
    assert set(with_clean) == {"backbone", "head", "classifier"}
    for name in ("backbone", "head"):
        clean_leaves, view_leaves = (
            jax.tree.leaves(with_clean[name]),
            jax.tree.leaves(with_views[name]),
        )
        for a, b in zip(clean_leaves, view_leaves, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4 * np.max(np.abs(b)))
    # The probe's gradient: softmax cross-entropy of a linear map of the inference-mode features
    # of the clean rows, computed here independently of the step.
    images = augment.eval_preprocess(batch["image"][::2], out_size=28)
    features = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                           train=False)["features"]  # fmt: skip
    labels = batch["label"][::2]
    assert config.model.ft_proj_selector == 0  # the probe reads the backbone features
    features = (features - norm["mean"]) / np.sqrt(norm["var"] + config.model.bn_epsilon)

    def probe_loss(classifier):
        logits = features @ classifier["kernel"] + classifier["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    expected = jax.grad(probe_loss)(state.params["classifier"])
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(with_clean["classifier"][name], expected[name], rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
    assert not np.allclose(with_views["classifier"]["kernel"], expected["kernel"], atol=1e-6)
    logits = features @ state.params["classifier"]["kernel"] + state.params["classifier"]["bias"]
    np.testing.assert_allclose(aux["probe_acc"], np.mean(np.argmax(logits, -1) == labels))


@pytest.mark.parametrize("every", [-1, -4])
def test_bad_clean_every_is_named(every):
    from simclr_jax import validation

    config = pretrain_fashion_mnist.get_config("tiny")
    config.probe.clean_every = every
    with pytest.raises(ValueError, match=r"probe.clean_every must be an int >= 0"):
        validation.validate_pretrain(config)
