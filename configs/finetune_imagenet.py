"""Fine-tune on ImageNet (tfds `imagenet2012` / `imagenet2012_subset`, prepared by the user).

    python -m simclr_jax.finetune --config=configs/finetune_imagenet.py:1pct \
        --workdir=gs://BUCKET/r152_3x_sk1_ft1pct --config.init_checkpoint=gs://BUCKET/r152_3x_sk1

Images stream from the host (random-resized crop there; flip on the accelerator); evaluation is the
0.875 centre crop of the whole validation split. The label subsets are tfds's
imagenet2012_subset/1pct and /10pct (the SimCLRv2 paper's image lists).

Arguments (simclr_jax.configs.arguments): recipe=linear_eval|semi|supervised and
fraction=1.0|0.1|0.01 (default recipe=linear_eval,fraction=1.0); linear_eval takes all labels,
semi the 1% / 10% subsets. Presets (the reference google-research/simclr README commands): 1pct
is recipe=semi,fraction=0.01, supervised_10pct is recipe=supervised,fraction=0.1, and so on.
  linear_eval (default)  frozen backbone (fine_tune_after_block=4), zero-initialised classifier,
                         momentum (the reference's Nesterov, learning rate inside the velocity; L2
                         on every non-BN weight, biases included), lr 0.1 x B/256, weight decay
                         1e-6, batch 4096, 90 epochs, no warmup, local BN. The README reports
                         ~64.5% top-1 for a 100-epoch SimCLR v1 ResNet-50; SimCLRv2 (800 epochs)
                         reports 71.7% (R50 1x) .. 79.8% (R152 3x SK).
  1pct, 10pct            fine-tune every layer from the first head layer (ft_proj_selector=1), global
                         BN, LARS lr 0.005 x sqrt(B), no weight decay, batch 1024, no warmup,
                         60 epochs (1%) / 30 epochs (10%). SimCLRv2 reports 57.9% / 68.4% top-1 (R50
                         1x) up to 74.9% / 80.1% (R152 3x SK).
  supervised             ResNet-50 from scratch on all labels: momentum, lr 0.1 x B/256, weight decay
                         1e-4, 5 warmup epochs, 90 epochs, batch 4096 (the usual large-batch recipe,
                         with cosine decay; the README's supervised column reports 76.6%).
  supervised_1pct, supervised_10pct
                         the same ResNet-50 from scratch on the 1% / 10% subsets with the 1pct /
                         10pct fine-tuning budget (same labels, same steps).
"""

from simclr_jax.configs import base
from simclr_jax.configs.arguments import Arguments

SUBSETS = {0.01: "1pct", 0.1: "10pct"}  # label fraction -> tfds imagenet2012_subset config
ARGUMENTS = Arguments(
    "finetune_imagenet",
    {"recipe": "linear_eval", "fraction": 1.0},
    choices={"recipe": ("linear_eval", "semi", "supervised"), "fraction": (1.0, 0.1, 0.01)},
    presets={
        "linear_eval": "recipe=linear_eval,fraction=1.0",
        "1pct": "recipe=semi,fraction=0.01",
        "10pct": "recipe=semi,fraction=0.1",
        "supervised": "recipe=supervised,fraction=1.0",
        "supervised_1pct": "recipe=supervised,fraction=0.01",
        "supervised_10pct": "recipe=supervised,fraction=0.1",
    },
)


def fine_tune_subset(c, subset: str, epochs: float) -> None:
    c.dataset.name = f"imagenet2012_subset/{subset}"
    c.model.ft_proj_selector = 1
    c.model.fine_tune_after_block = -1
    c.model.zero_init_logits_layer = True
    c.model.global_bn = True
    c.optim.name = "lars"
    c.optim.base_lr = 0.005
    c.optim.lr_scaling = "sqrt"
    c.optim.weight_decay = 0.0
    c.optim.warmup_epochs = 0.0
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_epochs = epochs


def from_scratch(c) -> None:
    c.init_checkpoint = "none"  # random initialisation, said explicitly
    c.model.depth = 50
    c.model.width_multiplier = 1
    c.model.sk_ratio = 0.0
    c.model.ft_proj_selector = 0
    c.model.zero_init_logits_layer = False


def get_config(arg: str | None = None):
    a = ARGUMENTS.parse(arg)
    if (a.recipe, a.fraction in SUBSETS) in (("linear_eval", True), ("semi", False)):
        allowed = "1.0" if a.recipe == "linear_eval" else "0.01 or 0.1"
        raise ValueError(
            f"finetune_imagenet: recipe={a.recipe} takes fraction={allowed}, got {a.fraction}"
        )
    c = base.finetune_config()
    c.dataset.name = "imagenet2012"
    c.dataset.source = "tfds"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "validation"
    c.dataset.image_size = 224
    c.augment.crop_min_area = 0.08
    c.dtype = "bfloat16"
    c.knn.k = 0  # streamed datasets are not embedded for the kNN monitor
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2500
    c.eval_every_steps = 0
    if a.recipe == "linear_eval":
        c.model.ft_proj_selector = 0
        c.model.fine_tune_after_block = 4
        c.model.zero_init_logits_layer = True
        c.model.global_bn = False
        c.optim.name = "momentum"
        c.optim.base_lr = 0.1
        c.optim.lr_scaling = "linear"
        c.optim.weight_decay = 1e-6
        c.optim.warmup_epochs = 0.0
        c.batch_size = 4096
        c.eval_batch_size = 4096
        c.num_epochs = 90.0
    elif a.fraction in SUBSETS:  # semi, or supervised with the same labels and steps
        subset = SUBSETS[a.fraction]
        fine_tune_subset(c, subset, 60.0 if subset == "1pct" else 30.0)
        if a.recipe == "supervised":
            from_scratch(c)
            c.optim.base_lr = 0.1
            c.optim.weight_decay = 1e-4
            c.optim.warmup_epochs = 1.0
    else:  # supervised on all labels
        from_scratch(c)
        c.model.global_bn = True
        c.optim.name = "momentum"
        c.optim.base_lr = 0.1
        c.optim.lr_scaling = "linear"
        c.optim.weight_decay = 1e-4
        c.optim.warmup_epochs = 5.0
        c.batch_size = 4096
        c.eval_batch_size = 4096
        c.num_epochs = 90.0
    return base.lock(c)
