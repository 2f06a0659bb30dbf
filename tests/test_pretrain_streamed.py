"""The host tf.data path of pretraining (variable-size ImageNet images), on tfds's mock data."""

import numpy as np
import pytest

from simclr_jax import parallel, pretrain
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.data import streaming
from simclr_jax.models import build_model

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
    mesh = parallel.make_mesh()
    dp = parallel.DataParallel(mesh)
    model = build_model(
        config.model,
        num_classes=1000,
        image_size=32,
        axis_name="data",
        classifier_stop_gradient=True,
    )
    with tfds.testing.mock_data(num_examples=20):
        assert streaming.is_streamed(config.dataset)
        data = pretrain.load_data(config, mesh)
        batch = data.batch_for_step(0)
        # Two independent host crops per image, uint8, at the network's size.
        assert batch["image"].shape == (8, 2, 32, 32, 3) and batch["image"].dtype == np.uint8
        state = pretrain.init_state(model, config, data.channels, 0.1)
        step = dp.map(
            pretrain.make_train_step(model, config),
            sharded_args=(False, True),
            sharded_outputs=(False, False),
        )
        state, metrics = step(dp.replicate(state), batch)
        assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
        probe = pretrain.evaluate_probe_on(dp, model, config, data, state)
    # The mock validation split has 20 examples: padded to 24, every real one counted once.
    assert probe["probe_count"] == 20
