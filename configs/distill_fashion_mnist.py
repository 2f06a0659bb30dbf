"""Distil a fine-tuned Fashion-MNIST teacher into a student on the (unlabelled) training images.

    python -m simclr_jax.distill --config=configs/distill_fashion_mnist.py:self \
        --workdir=/tmp/ds --config.teacher_checkpoint=/tmp/ft1
    python -m simclr_jax.distill --config=configs/distill_fashion_mnist.py:big_to_small \
        --workdir=/tmp/ds_small --config.teacher_checkpoint=/tmp/ft1

The teacher is a fine-tuning workdir (finetune_fashion_mnist.py, e.g. its 1pct preset); it labels
all 60,000 training images, whose own labels are never read (alpha = 0).

Arguments (simclr_jax.configs.arguments), default student=self,size=full:
  student=self    self-distillation: the student has the teacher's architecture (or
                  init_checkpoint's) and starts from scratch unless init_checkpoint is set.
  student=small   a narrower student: ResNet-18, base width 16, 2-layer head to 64 dims.
  size=full       temperature 1, alpha 0, batch 256, 30 epochs, LARS lr 0.1 x sqrt(B).
  size=demo       for a 2-core CPU after the demo fine-tuning (under a minute: 600 steps of 128
                  images, 1.3 epochs): meant to start from the pretraining checkpoint (pass
                  --config.init_checkpoint=PRETRAIN_WORKDIR; without it, it starts from scratch),
                  LARS lr 0.05 x sqrt(B), no weight decay (the step count and rate that kept
                  the student level with its teacher: benchmarks/RESULTS.md, "distillation").
  size=tiny       a few steps for the tests (no TensorBoard files).
Presets: self (the default), big_to_small (student=small), demo (size=demo), tiny (size=tiny).
"""

from simclr_jax.configs import base, pretrain_fashion_mnist
from simclr_jax.configs.arguments import Arguments

ARGUMENTS = Arguments(
    "distill_fashion_mnist",
    {"student": "self", "size": "full"},
    choices={"student": ("self", "small"), "size": pretrain_fashion_mnist.SIZES},
    presets={
        "self": "student=self,size=full",
        "big_to_small": "student=small,size=full",
        "demo": "student=self,size=demo",
        "tiny": "student=self,size=tiny",
    },
)


def get_config(arg: str | None = None):
    a = ARGUMENTS.parse(arg)
    c = base.distill_config()
    c.dataset.name = "fashion_mnist"
    c.dataset.image_size = 28
    c.augment.crop_min_area = 0.2  # as the Fashion-MNIST pretraining presets
    c.temperature = 1.0
    c.alpha = 0.0
    c.label_fraction = 0.01  # the teacher's labelled subset (used by the kNN monitor only)
    c.student.model.ft_proj_selector = 0
    c.student.model.zero_init_logits_layer = False
    c.optim.name = "lars"
    c.optim.base_lr = 0.1
    c.optim.lr_scaling = "sqrt"
    c.optim.weight_decay = 1e-4
    if a.student == "small":
        c.student.model.depth = 18
        c.student.model.base_width = 16
        c.student.model.num_proj_layers = 2
        c.student.model.proj_out_dim = 64
    if a.size == "full":
        c.batch_size = 256
        c.num_epochs = 30.0
        c.optim.warmup_epochs = 1.0
    elif a.size == "demo":
        c.augment.crop_min_area = 0.5  # as the demo fine-tuning
        c.batch_size = 128
        c.num_steps = 600  # 300 left the student under the LP-FT teacher (docstring)
        c.optim.base_lr = 0.05  # starting from pretrained weights: fine-tuning's rate
        c.optim.weight_decay = 0.0
        c.optim.warmup_epochs = 0.0
        c.log_every_steps = 50
    else:
        c.dataset.train_split = "train[:2000]"
        c.dataset.eval_split = "test[:200]"
        c.eval_batch_size = 200
        c.tensorboard = False  # metrics.jsonl only: no TensorFlow import in each test process
        c.batch_size = 16
        c.labeled_batch_size = 8
        c.num_steps = 3
        c.optim.warmup_epochs = 0.0
        c.evals.knn.k = 20
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
    return base.lock(c)
