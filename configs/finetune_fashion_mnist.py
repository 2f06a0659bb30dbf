"""Fine-tune on Fashion-MNIST: linear evaluation, semi-supervised fine-tuning, supervised baseline.

    python -m simclr_jax.finetune --config=configs/finetune_fashion_mnist.py:1pct \
        --workdir=/tmp/ft1 --config.init_checkpoint=/tmp/fm18
    python -m simclr_jax.finetune \
        --config=configs/finetune_fashion_mnist.py:recipe=supervised,fraction=0.01 \
        --workdir=/tmp/sup1

Augmentation is crop + flip (crop area 0.5-1 on these 28 px images). The fine-tuning recipes read
the architecture from --config.init_checkpoint (a pretraining workdir); the supervised recipe
trains the network of pretrain_fashion_mnist.py at the same size from scratch, on the same labels
(label_fraction, label_seed) for the same number of steps.

Arguments (simclr_jax.configs.arguments), default recipe=linear_eval,fraction=1.0,size=full:
  recipe=linear_eval  frozen backbone, classifier on its features: momentum, lr 0.1 x B/256, no
                      weight decay, zero-initialised classifier (the reference CIFAR-10
                      linear-eval command).
  recipe=semi         SimCLRv2 fine-tuning of every layer from the first head layer
                      (ft_proj_selector=1): LARS, lr 0.05 x sqrt(B) (the ImageNet recipe's 0.005
                      under-trains at these batch sizes), no weight decay, no warmup.
  recipe=supervised   the network from scratch (init_checkpoint=none), same labels and steps as
                      semi: LARS lr 0.1 x sqrt(B), weight decay 1e-4, 1 epoch of warmup.
  fraction=F          class-stratified fraction of the training labels (0.01 = 600 labels).
  size=full           for a GPU, ResNet-18: linear_eval batch 512, 100 epochs; semi / supervised
                      batch 64 for 60 epochs below 10% of the labels (1% = 540 steps), else
                      batch 256 for 30 epochs (10% = 690 steps), as the ImageNet recipe's 60/30.
  size=demo           for a 2-core CPU after the `demo` pretraining (the CPU-shaped convnet),
                      under a minute each at 1%: linear_eval batch 256, 1 epoch; semi /
                      supervised about 600 steps at any fraction, batch 60 below 10% of the labels
                      (60 epochs at 1%), else 256; semi at lr 0.01, supervised at 0.1 (each the
                      best of a grid: benchmarks/RESULTS.md, "tuning the demo recipe").
                      The demo's semi is LP-FT from the projection head's input: the classifier
                      on the backbone output (ft_proj_selector=0) and started at the logistic
                      regression of those features (init_classifier_by_linear_fit; RESULTS.md,
                      "LP-FT", compares it with fine-tuning from head layer 1).
  size=tiny           a few steps of the tiny pretraining's convnet, for the tests (no TensorBoard).
Presets: linear_eval (the default), 1pct, 10pct (semi at 0.01 / 0.1), supervised_1pct,
supervised_10pct, supervised (all labels), demo_linear_eval, demo_1pct, demo_supervised_1pct,
tiny (semi at 0.01), tiny_linear_eval (fraction 0.02), tiny_supervised; each is the key=value
string in PRESETS below.
"""

from simclr_jax.configs import base, pretrain_fashion_mnist, recipes
from simclr_jax.configs.arguments import Arguments
from simclr_jax.models import ARCHITECTURE_FIELDS

RECIPES = recipes.RECIPES
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split
DEMO_STEPS = 600  # fine-tuning steps of the demo size (semi and supervised), at any fraction
PRESETS = {
    "linear_eval": "recipe=linear_eval,fraction=1.0,size=full",
    "1pct": "recipe=semi,fraction=0.01,size=full",
    "10pct": "recipe=semi,fraction=0.1,size=full",
    "supervised_1pct": "recipe=supervised,fraction=0.01,size=full",
    "supervised_10pct": "recipe=supervised,fraction=0.1,size=full",
    "supervised": "recipe=supervised,fraction=1.0,size=full",
    "demo_linear_eval": "recipe=linear_eval,fraction=1.0,size=demo",
    "demo_1pct": "recipe=semi,fraction=0.01,size=demo",
    "demo_supervised_1pct": "recipe=supervised,fraction=0.01,size=demo",
    "tiny": "recipe=semi,fraction=0.01,size=tiny",
    "tiny_linear_eval": "recipe=linear_eval,fraction=0.02,size=tiny",
    "tiny_supervised": "recipe=supervised,fraction=0.01,size=tiny",
}
ARGUMENTS = Arguments(
    "finetune_fashion_mnist",
    {"recipe": "linear_eval", "fraction": 1.0, "size": "full"},
    choices={"recipe": RECIPES, "size": pretrain_fashion_mnist.SIZES},
    presets=PRESETS,
)


def pretrain_architecture(size: str) -> dict:
    """The architecture fields of pretrain_fashion_mnist.py's network of this size."""
    model = pretrain_fashion_mnist.get_config(f"size={size}").model
    return {name: model[name] for name in ARCHITECTURE_FIELDS}


def apply_recipe(c, recipe: str, fraction: float, batch_size: int, epochs: float, size: str):
    """One of recipes.RECIPES at this family's rates (transfer_digits.py applies them too)."""
    if recipe == "linear_eval":
        recipes.linear_eval(c, fraction=fraction, batch_size=batch_size, epochs=epochs)
    elif recipe == "semi":
        # The ImageNet recipe's 0.005 under-trains at these small batches.
        recipes.semi_supervised(
            c, fraction=fraction, batch_size=batch_size, epochs=epochs, base_lr=0.05
        )
    else:
        recipes.supervised(
            c, fraction=fraction, batch_size=batch_size, epochs=epochs,
            architecture=pretrain_architecture(size),
        )  # fmt: skip


def schedule(recipe: str, fraction: float, size: str) -> tuple[int, float]:
    """(batch size, epochs) of a recipe at a size (the docstring's table)."""
    if size == "tiny":
        return 16, 1.0
    if size == "demo":
        if recipe == "linear_eval":
            return 256, 1.0
        # About DEMO_STEPS steps at every fraction (the sweep's 60 to 60,000 labels).
        batch = 60 if fraction < 0.1 else 256
        return batch, DEMO_STEPS * batch / (TRAIN_IMAGES * fraction)
    if recipe == "linear_eval":
        return 512, 100.0
    return (64, 60.0) if fraction < 0.1 else (256, 30.0)


def get_config(arg: str | None = None):
    a = ARGUMENTS.parse(arg)
    c = base.finetune_config()
    c.dataset.name = "fashion_mnist"
    c.dataset.image_size = 28
    c.augment.crop_min_area = 0.5  # a milder crop than pretraining's 0.2: better for every recipe
    c.log_every_steps = 50
    apply_recipe(c, a.recipe, a.fraction, *schedule(a.recipe, a.fraction, a.size), a.size)
    if a.size == "demo":
        if a.recipe == "semi":
            c.optim.base_lr = 0.01  # after the convnet's pretraining (docstring)
            # LP-FT from the head's input (docstring; benchmarks/RESULTS.md, "LP-FT").
            c.model.ft_proj_selector = 0
            c.init_classifier_by_linear_fit = True
        c.log_every_steps = 25 if a.recipe == "linear_eval" else 50
    elif a.size == "tiny":
        c.dataset.train_split = "train[:2000]"
        c.dataset.eval_split = "test[:200]"
        c.eval_batch_size = 200
        c.tensorboard = False  # metrics.jsonl only: no TensorFlow import in each test process
        c.num_steps = 3
        c.evals.knn.k = 20
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
    return base.lock(c)
