"""Transfer a Fashion-MNIST pretraining to handwritten digits (scikit-learn's 8x8 digits at 28 px).

    python -m simclr_jax.finetune --config=configs/transfer_digits.py:demo_finetune \
        --workdir=/tmp/digits_ft --config.init_checkpoint=demo_out/pretrain
    python -m simclr_jax.transfer_demo --workdir=demo_out   # all three demo presets, one table

The target is data/digits.py: 1,797 real digits shipped with scikit-learn (`pip install
scikit-learn`, the [transfer] extra), upsampled once to 28x28x1, split into a fixed class-stratified
1,297 train / 500 test. The architecture comes from --config.init_checkpoint (a
pretrain_fashion_mnist.py workdir); the classifier is new (10 digit classes). Crop + no flip: a
mirrored digit is another symbol (or none).

Arguments: the recipes of finetune_fashion_mnist.py (recipe=linear_eval|semi|supervised,
fraction=F, default 1.0: all 1,297 labels; size=full|demo|tiny), so the two datasets are tuned alike,
with these schedules:
  size=full   linear_eval: batch 128, 100 epochs (1,000 steps); semi / supervised: batch 64,
              30 epochs (600 steps); the resnet18 pretraining's network.
  size=demo   after the `demo` pretraining, sized for a few minutes on a 2-core CPU
              (transfer_demo prints the table; benchmarks/RESULTS.md, "transfer", has the
              measured one): linear_eval batch 128, 30 epochs (300 steps); semi / supervised batch
              64, 15 epochs (300 steps).
  size=tiny   a few steps of the base-width-4 network of the `tiny` pretraining (tests).
Presets: linear_eval (the default), finetune (recipe=semi), scratch (recipe=supervised), the same
three with demo_ and tiny_ in front (demo_finetune, tiny_scratch, ...), and tiny
(= tiny_finetune).
"""

from simclr_jax.configs import base, pretrain_fashion_mnist
from simclr_jax.configs import finetune_fashion_mnist as recipes
from simclr_jax.configs.arguments import Arguments

_METHODS = {"linear_eval": "linear_eval", "finetune": "semi", "scratch": "supervised"}
_PREFIXES = {"": "full", "demo_": "demo", "tiny_": "tiny"}
PRESETS = {
    f"{prefix}{method}": f"recipe={recipe},fraction=1.0,size={size}"
    for prefix, size in _PREFIXES.items()
    for method, recipe in _METHODS.items()
} | {"tiny": "recipe=semi,fraction=1.0,size=tiny"}
ARGUMENTS = Arguments(
    "transfer_digits",
    {"recipe": "linear_eval", "fraction": 1.0, "size": "full"},
    choices={"recipe": recipes.RECIPES, "size": pretrain_fashion_mnist.SIZES},
    presets=PRESETS,
)
# size -> (batch, epochs) of linear evaluation, and of fine-tuning / from scratch.
SCHEDULES = {
    "full": ((128, 100.0), (64, 30.0)),
    "demo": ((128, 30.0), (64, 15.0)),
    "tiny": ((16, 1.0), (16, 1.0)),
}


def get_config(arg: str | None = None):
    a = ARGUMENTS.parse(arg)
    linear, tuned = SCHEDULES[a.size]
    c = base.finetune_config()
    c.dataset.name = "sklearn_digits"
    c.dataset.image_size = 28
    c.augment.crop_min_area = 0.5  # as the Fashion-MNIST fine-tuning: a mild crop at 28 px
    c.augment.flip = False
    c.eval_batch_size = 500  # the whole test split in one batch
    c.log_every_steps = 50
    batch, epochs = linear if a.recipe == "linear_eval" else tuned
    recipes.apply_recipe(c, a.recipe, a.fraction, batch, epochs, a.size)
    if a.size == "tiny":
        c.dataset.train_split = "train[:256]"
        c.num_steps = 2
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.evals.knn.k = 0  # one program less to compile in the tests
        c.tensorboard = False  # metrics.jsonl only: no TensorFlow import in each test process
    return base.lock(c)
