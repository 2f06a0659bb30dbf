"""Pretrain on Fashion-MNIST: the embedded default, real data available offline.

    python -m simclr_jax.pretrain --config=configs/pretrain_fashion_mnist.py \
        --workdir=/tmp/fm
    python -m simclr_jax.pretrain --config=configs/pretrain_fashion_mnist.py:resnet18 \
        --workdir=/tmp/fm18

Argument (simclr_jax.configs.arguments): size=demo|full|tiny (default demo).
  size=demo   the CPU-shaped convnet (models/convnet.py: stride-2 stem, 32/64/128 channels at
              14/7 px, 512-d features) for 6.5 epochs with AdamW, sized for about ten minutes on
              a 2-core CPU; `make demo` runs it and compares its features with raw pixels
              (benchmarks/RESULTS.md has the measured times and accuracies).
              Its probe trains on every image un-augmented (probe.clean_every=1).
  size=full   the standard-width ResNet-18 with the CIFAR stem, for a GPU: 200 epochs.
  size=tiny   a few-step smoke configuration used by the tests: the convnet at base width 2
              (32-d features), no TensorBoard files.
Presets: demo, resnet18 (= size=full), tiny.
"""

from simclr_jax.configs import base
from simclr_jax.configs.arguments import Arguments

SIZES = ("full", "demo", "tiny")  # the Fashion-MNIST configs' sizes (network and schedule)
ARGUMENTS = Arguments(
    "pretrain_fashion_mnist",
    {"size": "demo"},
    choices={"size": SIZES},
    presets={"demo": "size=demo", "resnet18": "size=full", "tiny": "size=tiny"},
)


def get_config(arg: str | None = None):
    size = ARGUMENTS.parse(arg).size
    c = base.pretrain_config()
    c.dataset.name = "fashion_mnist"
    c.dataset.image_size = 28
    # Grayscale 28 px images: the CIFAR-style recipe (no blur, colour strength 0.5).
    c.augment.color_jitter_strength = 0.5
    c.augment.use_blur = False
    c.augment.crop_min_area = 0.2
    c.model.depth = 18
    c.model.num_proj_layers = 2
    c.model.proj_out_dim = 64
    c.loss.temperature = 0.2
    c.optim.name = "lars"
    c.optim.base_lr = 0.2
    c.optim.lr_scaling = "sqrt"
    c.optim.weight_decay = 1e-4
    if size == "demo":
        # The CPU-shaped convnet (models/convnet.py): 512-d features. AdamW at 2e-3; the knobs
        # tried around it are in benchmarks/RESULTS.md ("tuning the demo recipe").
        c.model.backbone = "convnet"
        c.model.depth = 4
        c.model.base_width = 32
        c.model.proj_out_dim = 128
        c.optim.name = "adamw"
        c.optim.base_lr = 2e-3
        c.optim.lr_scaling = "linear"
        c.optim.weight_decay = 1e-4
        c.batch_size = 256
        # 6.5 epochs (1524 steps): the demo's time budget (benchmarks/RESULTS.md, "demo").
        c.num_epochs = 6.5
        c.optim.warmup_epochs = 1.0
        c.log_every_steps = 50
        base.every(c.evals, 470)  # about every 2 epochs: the probe and kNN curves of curves.png
        # The probe sees every image of the batch clean (256 a step): closer to the offline linear
        # classifier than every 2nd image (benchmarks/RESULTS.md, "tuning ... its probe").
        c.probe.clean_every = 1
        c.checkpoint_every_steps = 500
    elif size == "full":
        c.batch_size = 512
        c.num_epochs = 200.0
        c.optim.warmup_epochs = 10.0
        c.log_every_steps = 100
        base.every(c.evals, 2000)
    else:
        # The step mechanics at the least compile time: the demo's convnet at base width 2
        # (32-d features, as a base-width-4 ResNet-18's), which compiles in about half the time.
        c.model.backbone = "convnet"
        c.model.depth = 4
        c.model.base_width = 2
        c.model.proj_out_dim = 16
        c.batch_size = 32
        c.eval_batch_size = 250
        c.num_steps = 4
        c.optim.warmup_epochs = 0.0
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
        c.tensorboard = False  # metrics.jsonl only: no TensorFlow import in each test process
    return base.lock(c)
