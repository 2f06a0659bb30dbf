"""The host tf.data path of pretraining (variable-size ImageNet images), on tfds's mock data."""

import numpy as np
import pytest

from simclr_jax import parallel, pretrain
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.data import stage_data, streaming
from simclr_jax.train import evaluators, runner

tfds = pytest.importorskip("tensorflow_datasets")  # the [tfds] extra; make test installs it


def test_imagenet_pretraining_streams_two_host_crops_per_image():
    config = pretrain_fashion_mnist.get_config("tiny")
    config.dataset.name = "imagenet2012"
    config.dataset.source = "tfds"
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.image_size = 32  # the ImageNet stem needs 32 px at least
    config.augment.use_blur = True
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_steps = 2  # mock data records no split sizes, so the length is in steps
    config.probe.clean_every = 0  # as pretrain_imagenet.py: the host streams crops only
    dp = parallel.from_config(config)
    model = pretrain.make_model(config, 1000)
    with tfds.testing.mock_data(num_examples=20):
        assert streaming.is_streamed(config.dataset)
        data = stage_data.pretraining_data(config, dp.mesh)
        batch = data.batch_for_step(0)
        # Two independent host crops per image, uint8, at the network's size.
        assert batch["image"].shape == (8, 2, 32, 32, 3) and batch["image"].dtype == np.uint8
        state = pretrain.init_state(model, config, data.channels, 0.1)
        step = runner.map_step(dp, pretrain.make_train_step(model, config), skip_nonfinite=False)
        state, metrics = step(dp.replicate(state), batch)
        assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
        probe = evaluators.ExactEvaluator(
            dp, model, 32, data.eval_batches, precropped=True, prefix="eval_probe_"
        )(state)
        # A probe on clean images needs whole images: host crops are refused by name.
        config.probe.clean_every = 4
        clean_probe = runner.map_step(
            dp, pretrain.make_train_step(model, config), skip_nonfinite=False
        )
        with pytest.raises(ValueError, match="probe.clean_every=4 needs whole images"):
            clean_probe(dp.replicate(pretrain.init_state(model, config, data.channels, 0.1)), batch)
    # The mock validation split has 20 examples: padded to 24, every real one counted once.
    assert probe["eval_probe_count"] == 20
