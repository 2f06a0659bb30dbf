"""Fine-tuning: label subsets, what freezing freezes, the kNN monitor, presets and config errors."""

from __future__ import annotations

import collections
import hashlib
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from devices import xla_flags
from ml_collections import config_flags

from simclr_jax import finetune, parallel, saved_run, validation
from simclr_jax.data import stage_data
from simclr_jax.data.arrays import ImageArrays
from simclr_jax.models import build_model, frozen_tree
from simclr_jax.train import evaluators
from simclr_jax.train.update import fine_tune_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"  # loaded by path below, as the command line does


def load_config(file: str, preset: str, *overrides: str):
    """A config file and preset parsed as the command line does (fresh flag registry)."""
    argv = ["prog", f"--config={CONFIGS / file}:{preset}", *overrides]
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=registry, lock_config=True)
    saved, sys.argv = sys.argv, argv  # config_flags reads overrides from sys.argv
    try:
        registry(argv)
    finally:
        sys.argv = saved
    return registry.config


def subset_digest(labels: np.ndarray, fraction: float, seed: int) -> str:
    """Digest of the chosen examples (images carry each example's position)."""
    positions = np.arange(len(labels))
    images = np.stack([positions % 256, positions // 256], -1).astype(np.uint8)[:, None, :, None]
    chosen = stage_data.labeled_subset(ImageArrays(images, labels, 10), fraction, seed)
    return hashlib.sha256(chosen.labels.tobytes() + chosen.images.tobytes()).hexdigest()


def skewed_labels() -> np.ndarray:
    """10 classes of different sizes (50..500), in a shuffled order."""
    labels = np.repeat(np.arange(10, dtype=np.int32), np.arange(1, 11) * 50)
    return np.random.default_rng(7).permutation(labels)


def test_label_subsets_are_stratified_and_deterministic():
    labels = skewed_labels()
    arrays = ImageArrays(np.zeros((len(labels), 1, 1, 1), np.uint8), labels, 10)
    for fraction in (0.01, 0.1, 0.37):
        subset = stage_data.labeled_subset(arrays, fraction, 3)
        counts = np.bincount(subset.labels, minlength=10)
        expected = [max(1, round(fraction * n)) for n in np.bincount(labels)]
        np.testing.assert_array_equal(counts, expected)
    assert stage_data.labeled_subset(arrays, 1.0, 3) is arrays
    assert subset_digest(labels, 0.1, 3) == subset_digest(labels, 0.1, 3)
    assert subset_digest(labels, 0.1, 3) != subset_digest(labels, 0.1, 4)


def test_label_subsets_are_the_same_in_another_process_with_other_devices():
    """Every host computes the subset alone: a process with 8 devices and another hash seed
    must pick exactly the same examples."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import jax
        import test_finetune as t
        assert jax.device_count() == 8
        print(t.subset_digest(t.skewed_labels(), 0.1, 3))
        """
    )
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(8),
        JAX_PLATFORMS="cpu",
        PYTHONHASHSEED="12345",
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == subset_digest(skewed_labels(), 0.1, 3)


@pytest.fixture(scope="module")
def tiny_model_and_params():
    config = load_config("finetune_fashion_mnist.py", "tiny_supervised")
    config = saved_run.resolve_model(config, "model", None)
    model = build_model(config.model, num_classes=10, image_size=28)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
    )
    return model, variables


def paths_where(tree, value: bool) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path) for path, leaf in flat if leaf == value}


def test_frozen_tree_freezes_stages_unused_head_layers_and_all_but_the_classifier(
    tiny_model_and_params,
):
    _, variables = tiny_model_and_params
    params = variables["params"]
    frozen = paths_where(frozen_tree(params, fine_tune_after_block=2, ft_proj_selector=1), True)
    prefixes = {"/".join(p.split("/")[:2]) for p in frozen}
    assert prefixes == {
        "backbone/stem",
        "backbone/block_group1",
        "backbone/block_group2",
        "head/dense2",
        "head/bn2",
    }
    # Linear evaluation from head layer 1: the reference trains that layer with the classifier;
    # freeze_head_in_linear_eval trains the classifier alone.
    linear = frozen_tree(params, fine_tune_after_block=4, ft_proj_selector=1)
    assert paths_where(linear, False) == {
        "classifier/kernel", "classifier/bias", "head/dense1/kernel", "head/bn1/scale",
        "head/bn1/bias",
    }  # fmt: skip
    probe = frozen_tree(
        params, fine_tune_after_block=4, ft_proj_selector=1, freeze_head_in_linear_eval=True
    )
    assert paths_where(probe, False) == {"classifier/kernel", "classifier/bias"}
    stats = frozen_tree(variables["batch_stats"], fine_tune_after_block=-1, ft_proj_selector=0)
    assert {"/".join(p.split("/")[:2]) for p in paths_where(stats, True)} == {
        "head/bn1",
        "head/bn2",
    }


# Linear evaluation from head layer 1 of the tiny 2-layer head: what changes. The reference stops
# the gradient only at the ResNet output (tf2/resnet.py), so head layer 1 trains with the
# classifier, its BN in training mode (its statistics move); the backbone (trainable=False: no
# update, BN in inference mode) and head layer 2 (it feeds nothing; the reference would still
# shrink its kernel by the L2 term, ours keeps it frozen) stay bit-identical.
REFERENCE_LINEAR_EVAL = {
    "params": {"classifier", "head/dense1", "head/bn1"},
    "batch_stats": {"head/bn1"},
}
CLASSIFIER_ONLY = {"params": {"classifier"}, "batch_stats": set()}


@pytest.mark.parametrize(
    "freeze_head,changed", [(False, REFERENCE_LINEAR_EVAL), (True, CLASSIFIER_ONLY)]
)
def test_linear_evaluation_from_a_head_layer_changes_what_the_reference_changes(
    freeze_head, changed
):
    """After two steps exactly the expected parameters and BN statistics moved (every leaf under
    them), and every other one is bit-identical."""
    config = load_config(
        "finetune_fashion_mnist.py", "tiny_supervised", "--config.model.fine_tune_after_block=4",
        "--config.model.ft_proj_selector=1", "--config.optim.name=momentum",
        "--config.optim.weight_decay=0.01", "--config.optim.base_lr=1.0",
        f"--config.model.freeze_head_in_linear_eval={freeze_head}",
    )  # fmt: skip
    config = saved_run.resolve_model(config, "model", None)
    model = build_model(config.model, num_classes=10, image_size=28, axis_name="data")
    # Random values of the right shapes (initialising the model would compile a large program),
    # with non-trivial BN statistics so "unchanged" cannot mean "still at their initial values".
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
    )
    draw = np.random.default_rng(1)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "'var'" in name or "'scale'" in name:
            value = draw.uniform(0.5, 1.5, leaf.shape)
        else:
            value = draw.normal(0.0, 0.3 / np.sqrt(np.prod(leaf.shape[:-1]) or 1), leaf.shape)
        return jnp.asarray(value, jnp.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    dp = parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))
    state = dp.replicate(fine_tune_state(config.model, config.optim, variables, 1.0))
    step = dp.map(
        finetune.make_train_step(model, config), sharded_args=(False, True), sharded_outputs=False
    )
    rng = np.random.default_rng(0)
    new = state
    for _ in range(2):
        batch = {
            "image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, 8, dtype=np.int32),
        }
        new, aux = step(new, jax.device_put(batch, dp.batch_sharding))
    assert np.isfinite(float(aux["loss"]))
    for collection in ("params", "batch_stats"):
        before = jax.tree_util.tree_flatten_with_path(getattr(state, collection))[0]
        after = jax.tree.leaves(getattr(new, collection))
        moved = set()
        for (path, old), updated in zip(before, after, strict=True):
            name = "/".join(str(k.key) for k in path)
            module = name.rsplit("/", 1)[0]  # e.g. head/bn1 for head/bn1/scale
            if module in changed[collection]:
                assert not np.array_equal(old, updated), name
                moved.add(module)
            else:
                np.testing.assert_array_equal(old, updated, err_msg=name)
        assert moved == changed[collection], collection


def test_knn_monitor_matches_brute_force_numpy():
    """The monitor embeds both splits with the model (padded last batch dropped) and votes like a
    brute-force NumPy kNN on the same features."""

    class PixelModel:  # features = pixels times a fixed matrix
        def apply(self, variables, images, train):
            flat = images.reshape(images.shape[0], -1)
            return {"features": flat @ variables["params"]["w"]}

    State = collections.namedtuple("State", "params batch_stats")
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 256, (3, 4, 4, 1))

    def split(n):
        labels = rng.integers(0, 3, n).astype(np.int32)
        noise = rng.integers(-200, 200, (n, 4, 4, 1))
        images = np.clip(centres[labels] + noise, 0, 255).astype(np.uint8)
        return ImageArrays(images, labels, 3)

    train, test = split(45), split(29)
    w = rng.normal(size=(16, 5)).astype(np.float32)
    state = State({"w": jnp.asarray(w)}, {})
    config = load_config("finetune_fashion_mnist.py", "tiny", "--config.evals.knn.k=7")
    config.dataset.image_size = 4
    config.eval_batch_size = 8  # 45 and 29 examples: padded last batches
    config.evals.knn.temperature = 0.5
    dp = parallel.DataParallel(parallel.make_mesh(jax.devices()[:1]))
    knn = config.evals.knn
    monitor = evaluators.KnnMonitor(
        dp, PixelModel(), 4, train, test, batch_size=config.eval_batch_size, k=knn.k,
        temperature=knn.temperature,
    )  # fmt: skip
    result = monitor(state)

    def unit(x):
        x = (x.reshape(len(x), -1) / 255.0) @ w
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    similarity = unit(test.images) @ unit(train.images).T
    votes = np.zeros((len(test), 3))
    for q in range(len(test)):
        nearest = np.argsort(-similarity[q])[:7]
        for i in nearest:
            votes[q, train.labels[i]] += np.exp(similarity[q, i] / 0.5)
    expected = np.mean(votes.argmax(1) == test.labels)
    assert result["knn_top1"] == pytest.approx(expected)
    assert 0.0 < expected < 1.0


@pytest.mark.parametrize(
    "file,presets",
    [
        (
            "finetune_fashion_mnist.py",
            ["linear_eval", "1pct", "10pct", "supervised_1pct", "supervised_10pct", "supervised",
             "demo_linear_eval", "demo_1pct", "demo_supervised_1pct", "tiny", "tiny_linear_eval",
             "tiny_supervised"],
        ),
        (
            "finetune_imagenet.py",
            ["linear_eval", "1pct", "10pct", "supervised", "supervised_1pct", "supervised_10pct"],
        ),
    ],
)  # fmt: skip
def test_presets_load_and_validate(file, presets):
    for preset in presets:
        config = load_config(file, preset)
        validation.validate_finetune(config)
        assert 0 < config.label_fraction <= 1 and config.batch_size > 0


def test_reference_values_and_same_budget_baselines():
    linear = load_config("finetune_imagenet.py", "linear_eval")
    assert (linear.model.fine_tune_after_block, linear.optim.name, linear.optim.base_lr) == (
        4, "momentum", 0.1,
    )  # fmt: skip
    assert (linear.batch_size, linear.num_epochs, linear.optim.weight_decay) == (4096, 90, 1e-6)
    one = load_config("finetune_imagenet.py", "1pct")
    assert one.dataset.name == "imagenet2012_subset/1pct" and one.num_epochs == 60
    assert (one.optim.name, one.optim.base_lr, one.optim.lr_scaling) == ("lars", 0.005, "sqrt")
    assert one.model.ft_proj_selector == 1
    demo, scratch = (
        load_config("finetune_fashion_mnist.py", p) for p in ("demo_1pct", "demo_supervised_1pct")
    )
    for field in ("label_fraction", "label_seed", "batch_size", "num_epochs", "num_steps"):
        assert demo[field] == scratch[field], field
    # The scratch arm trains the demo pretraining's network (the CPU-shaped convnet).
    assert scratch.init_checkpoint == "none"
    assert (scratch.model.backbone, scratch.model.depth, scratch.model.base_width) == (
        "convnet", 4, 32,
    )  # fmt: skip


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.label_fraction=0.0", "label_fraction"),
        ("--config.label_fraction=1.5", "label_fraction"),
        ("--config.evals.knn.k=-1", "knn.k"),
        ("--config.augment.crop_min_area=0.0", "crop_min_area"),
    ],
)
def test_bad_values_name_their_field(override, message):
    with pytest.raises(ValueError, match=message):
        validation.validate_finetune(load_config("finetune_fashion_mnist.py", "tiny", override))


def test_missing_checkpoint_and_selector_beyond_the_head(tmp_path):
    config = load_config(
        "finetune_fashion_mnist.py", "tiny", f"--config.init_checkpoint={tmp_path / 'nowhere'}"
    )
    with pytest.raises(ValueError, match="init_checkpoint"):
        finetune.train_and_evaluate(config, str(tmp_path / "ft"))
    config = load_config("finetune_fashion_mnist.py", "tiny_supervised")
    config.model.ft_proj_selector = 3  # the tiny head has 2 layers
    with pytest.raises(ValueError, match="ft_proj_selector"):
        finetune.train_and_evaluate(config, str(tmp_path / "ft2"))


def test_finetune_model_config_covers_every_model_field():
    """A model field missing here would silently not be inherited from the checkpoint."""
    from simclr_jax import saved_run
    from simclr_jax.configs import base

    inherited = set(base.finetune_model_config()) - set(saved_run.ARCHITECTURE_FIELDS)
    assert set(base.finetune_model_config()) == set(base.model_config())
    assert inherited == {
        "ft_proj_selector", "zero_init_logits_layer", "fine_tune_after_block", "global_bn",
        "freeze_head_in_linear_eval",
    }  # fmt: skip
