"""Pretrain on CIFAR-10 (tfds `cifar10`; 32 px, so the CIFAR stem and no blur).

    python -m simclr_jax.pretrain --config=configs/pretrain_cifar10.py --workdir=/tmp/c10
    python -m simclr_jax.pretrain --config=configs/pretrain_cifar10.py:small_batch \
        --workdir=/tmp/c10s

Argument (simclr_jax.configs.arguments): recipe=reference|small_batch (default reference); the
presets reference and small_batch are the same.
  reference (default)  the reference README's CIFAR-10 command: ResNet-18, the default 3-layer head
                       to 128 dims, batch 512, LARS lr 1.0 (linear scaling), weight decay 1e-4,
                       temperature 0.5, colour strength 0.5, no blur, 10 warmup epochs, 1000 epochs.
                       Its README reports about 91% accuracy after its linear evaluation (the SimCLR
                       paper reports 94% for a ResNet-50).
  small_batch          batch 256, lr 0.2 with sqrt scaling, a 2-layer head to 64 dims, temperature 0.2.
"""

from simclr_jax.configs import base
from simclr_jax.configs.arguments import Arguments

ARGUMENTS = Arguments(
    "pretrain_cifar10",
    {"recipe": "reference"},
    choices={"recipe": ("reference", "small_batch")},
    presets={"reference": "recipe=reference", "small_batch": "recipe=small_batch"},
)


def get_config(arg: str | None = None):
    recipe = ARGUMENTS.parse(arg).recipe
    c = base.pretrain_config()
    c.dataset.name = "cifar10"
    c.dataset.image_size = 32
    c.augment.color_jitter_strength = 0.5
    c.augment.use_blur = False
    c.model.depth = 18
    c.optim.name = "lars"
    c.optim.weight_decay = 1e-4
    c.optim.warmup_epochs = 10.0
    c.num_epochs = 1000.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    base.every(c.evals, 10_000)
    if recipe == "reference":
        c.batch_size = 512
        c.optim.base_lr = 1.0
        c.optim.lr_scaling = "linear"
        c.loss.temperature = 0.5
        c.model.num_proj_layers = 3  # the reference's default (its CIFAR command keeps it)
    else:
        c.batch_size = 256
        c.optim.base_lr = 0.2
        c.optim.lr_scaling = "sqrt"
        c.loss.temperature = 0.2
        c.model.num_proj_layers = 2
        c.model.proj_out_dim = 64
    return base.lock(c)
