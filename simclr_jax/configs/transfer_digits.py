"""Transfer a Fashion-MNIST pretraining to handwritten digits (scikit-learn's 8x8 digits at 28 px).

    python -m simclr_jax.finetune --config=configs/transfer_digits.py:demo_finetune \
        --workdir=/tmp/digits_ft --config.init_checkpoint=demo_out/pretrain
    python -m simclr_jax.transfer_demo --workdir=demo_out   # all three demo presets, one table

The target is data/digits.py: 1,797 real digits shipped with scikit-learn (`pip install
scikit-learn`, the [transfer] extra), upsampled once to 28x28x1, split into a fixed class-stratified
1,297 train / 500 test. Every preset uses all 1,297 training labels. The architecture comes from
--config.init_checkpoint (a configs/pretrain_fashion_mnist.py workdir); the classifier is new (10
digit classes). Crop + no flip: a mirrored digit is another symbol (or none).

Presets (pretraining preset in brackets), the same recipes as configs/finetune_fashion_mnist.py:
  linear_eval (default)  frozen backbone, classifier on its features: momentum, lr 0.1 x B/256,
                         zero-initialised classifier, batch 128, 100 epochs (1,000 steps) [resnet18].
  finetune               every layer from the first head layer (ft_proj_selector=1), LARS,
                         lr 0.05 x sqrt(B), batch 64, 30 epochs (600 steps) [resnet18].
  scratch                the resnet18 network from scratch: same labels and steps as finetune,
                         LARS lr 0.1 x sqrt(B), weight decay 1e-4, 1 epoch of warmup.
  demo_linear_eval, demo_finetune, demo_scratch
                         the same after the `demo` pretraining (ResNet-18, base width 8), sized so
                         the three take about 3 minutes on a 2-core CPU (transfer_demo prints the
                         table; README has the measured one): batch 64, 15 epochs (300 steps) for
                         fine-tuning and scratch, batch 128, 30 epochs (300 steps) for linear eval.
                         Measured after a 200-step demo pretraining (probe 68.3%): 86.0% linear,
                         96.8% fine-tuned, 98.0% from scratch (test top-1, seed 0; 2.6 minutes in all).
                         This small Fashion-MNIST network does not beat training from scratch on
                         digits, even with 10% of the labels (90.6% vs 93.4%, 300 steps each).
  tiny, tiny_linear_eval, tiny_scratch
                         a few steps of the base-width-4 network of the `tiny` pretraining (tests).
"""

import importlib.util
import pathlib

from simclr_jax import config as base


def fashion_mnist_recipes():
    """configs/finetune_fashion_mnist.py as a module: its recipes (linear_eval, semi_supervised,
    supervised) are the ones transferred here, so the two datasets are tuned alike."""
    path = pathlib.Path(__file__).with_name("finetune_fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("finetune_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRESETS = (
    "linear_eval", "finetune", "scratch",
    "demo_linear_eval", "demo_finetune", "demo_scratch",
    "tiny", "tiny_linear_eval", "tiny_scratch",
)  # fmt: skip
# Size (preset prefix) -> (batch, epochs) for linear evaluation and for fine-tuning / scratch, and
# the configs/pretrain_fashion_mnist.py preset whose network the scratch runs train.
SIZES = {
    "": ((128, 100.0), (64, 30.0), "resnet18"),
    "demo_": ((128, 30.0), (64, 15.0), "demo"),
    "tiny_": ((16, 1.0), (16, 1.0), "tiny"),
}


def split_preset(preset: str) -> tuple[str, str]:
    """'demo_finetune' -> ('demo_', 'finetune'); 'tiny' -> ('tiny_', 'finetune')."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for transfer_digits: {', '.join(PRESETS)}")
    if preset == "tiny":
        return "tiny_", "finetune"
    for size in ("demo_", "tiny_"):
        if preset.startswith(size):
            return size, preset.removeprefix(size)
    return "", preset


def get_config(arg: str | None = None):
    size, method = split_preset(arg or "linear_eval")
    (linear_batch, linear_epochs), (batch, epochs), architecture = SIZES[size]

    recipes = fashion_mnist_recipes()
    c = base.finetune_config()
    c.dataset.name = "sklearn_digits"
    c.dataset.image_size = 28
    c.augment.crop_min_area = 0.5  # as the Fashion-MNIST fine-tuning: a mild crop at 28 px
    c.augment.flip = False
    c.eval_batch_size = 500  # the whole test split in one batch
    c.log_every_steps = 50
    if method == "linear_eval":
        recipes.linear_eval(c, batch_size=linear_batch, epochs=linear_epochs)
    elif method == "finetune":
        recipes.semi_supervised(c, 1.0, batch_size=batch, epochs=epochs)
    else:
        recipes.supervised(c, 1.0, batch_size=batch, epochs=epochs, architecture=architecture)
    if size == "demo_":
        c.eval_every_steps = 0  # evaluate once, at the end
    if size == "tiny_":
        c.dataset.train_split = "train[:256]"
        c.num_steps = 2
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.knn.k = 0  # one program less to compile in the tests
    return base.lock(c)
