"""Fine-tune on CIFAR-10 (tfds `cifar10`) after configs/pretrain_cifar10.py: one GPU's recipe.

    tfds build cifar10                                          # once: ~170 MB to ~/tensorflow_datasets
    python -m simclr_jax.finetune --config=configs/finetune_cifar10.py \
        --workdir=/tmp/c10_linear --config.init_checkpoint=/tmp/c10
    python -m simclr_jax.finetune --config=configs/finetune_cifar10.py:1pct \
        --workdir=/tmp/c10_1pct --config.init_checkpoint=/tmp/c10

The architecture comes from --config.init_checkpoint (the pretraining workdir); the supervised
recipes train pretrain_cifar10.py's ResNet-18 from scratch on the same labels for the same steps.
Augmentation is crop + flip at 32 px.

Arguments (simclr_jax.configs.arguments), default recipe=linear_eval,fraction=1.0:
  linear_eval (default)  the reference README's CIFAR-10 linear evaluation: frozen backbone, momentum
                         lr 0.1 x B/256, no weight decay, batch 512, 100 epochs. The README reports
                         about 91% top-1 after its 1000-epoch ResNet-18 pretraining.
  1pct, 10pct            SimCLRv2 fine-tuning of every layer from the first head layer on 1% (500)
                         or 10% (5,000) of the labels: LARS lr 0.05 x sqrt(B), batch 64 for 60
                         epochs (1%) or 256 for 30 epochs (10%), as the Fashion-MNIST recipe.
  supervised, supervised_1pct, supervised_10pct
                         the ResNet-18 from scratch on all labels / the same 1% / 10%.
"""

from simclr_jax.configs import base, pretrain_cifar10, recipes
from simclr_jax.configs.arguments import Arguments
from simclr_jax.models import ARCHITECTURE_FIELDS

ARGUMENTS = Arguments(
    "finetune_cifar10",
    {"recipe": "linear_eval", "fraction": 1.0},
    choices={"recipe": recipes.RECIPES},
    presets={
        "linear_eval": "recipe=linear_eval,fraction=1.0",
        "1pct": "recipe=semi,fraction=0.01",
        "10pct": "recipe=semi,fraction=0.1",
        "supervised": "recipe=supervised,fraction=1.0",
        "supervised_1pct": "recipe=supervised,fraction=0.01",
        "supervised_10pct": "recipe=supervised,fraction=0.1",
    },
)


def get_config(arg: str | None = None):
    a = ARGUMENTS.parse(arg)
    c = base.finetune_config()
    c.dataset.name = "cifar10"
    c.dataset.image_size = 32
    c.log_every_steps = 100
    budget = dict(fraction=a.fraction, batch_size=64, epochs=60.0)
    if a.fraction >= 0.1:
        budget.update(batch_size=256, epochs=30.0)
    if a.recipe == "linear_eval":
        recipes.linear_eval(c, fraction=a.fraction, batch_size=512, epochs=100.0)
    elif a.recipe == "semi":
        recipes.semi_supervised(c, **budget, base_lr=0.05)
    else:
        model = pretrain_cifar10.get_config().model
        architecture = {name: model[name] for name in ARCHITECTURE_FIELDS}
        recipes.supervised(c, **budget, architecture=architecture)
    return base.lock(c)
