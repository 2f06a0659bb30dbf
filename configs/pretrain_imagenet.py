"""Pretrain on ImageNet (tfds `imagenet2012`, prepared by the user; 224 px crops made on the host).

    python -m simclr_jax.pretrain --config=configs/pretrain_imagenet.py:v1 \
        --workdir=gs://BUCKET/r50
    python -m simclr_jax.pretrain --config=configs/pretrain_imagenet.py:r152_3x_sk1 \
        --workdir=...

Arguments (simclr_jax.configs.arguments): version=1|2 (the recipe, default 1), depth (default 50),
width (the width multiplier, default 1), sk=0|1 (selective kernels, default 0); e.g.
`:version=2,depth=101,width=2,sk=1` is the preset r101_2x_sk1.
Presets:
  v1 (default)         SimCLR v1: ResNet-50 1x, 2-layer head, batch 4096, LARS lr 0.3 (linear scaling),
                       weight decay 1e-6, temperature 0.1, 100 epochs, blur on, v1's additive
                       brightness (the released code uses v2's multiplicative one for every run).
                       The paper reports 69.3% linear-eval top-1 for 1000 epochs (about 64-66% at
                       100 epochs).
  rDEPTH_Wx_skS        SimCLRv2 (r50_1x_sk0 ... r152_3x_sk1): 3-layer head, batch 4096, LARS lr 0.1 with
                       sqrt scaling (6.4), weight decay 1e-4, temperature 0.1, 800 epochs;
                       sk1 = selective kernels with ratio 0.0625 (and the ResNet-D stem and shortcut).
                       All v2 presets use the memory of negatives (config.memory): an EMA network
                       (decay 0.999) fills a 65,536-entry queue of extra negatives.
"""

from simclr_jax.configs import base
from simclr_jax.configs.arguments import Arguments

V2_PRESETS = {
    f"r{depth}_{width}x_sk{sk}": f"version=2,depth={depth},width={width},sk={sk}"
    for depth in (50, 101, 152, 200)
    for width in (1, 2, 3)
    for sk in (0, 1)
}
ARGUMENTS = Arguments(
    "pretrain_imagenet",
    {"version": 1, "depth": 50, "width": 1, "sk": 0},
    choices={"version": (1, 2), "sk": (0, 1)},
    presets={"v1": "version=1,depth=50,width=1,sk=0", **V2_PRESETS},
)


def get_config(arg: str | None = None):
    a = ARGUMENTS.parse(arg)
    c = base.pretrain_config()
    c.dataset.name = "imagenet2012"
    c.dataset.source = "tfds"
    c.dataset.eval_split = "validation"
    c.dataset.image_size = 224
    c.augment.color_jitter_strength = 1.0
    c.augment.use_blur = True
    c.batch_size = 4096
    c.eval_batch_size = 4096
    c.loss.temperature = 0.1
    c.optim.name = "lars"
    c.optim.warmup_epochs = 10.0
    c.dtype = "bfloat16"
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2500
    base.every(c.evals, 10_000)
    c.probe.clean_every = 0  # the host streams cropped views: the probe trains on them
    c.model.depth = a.depth
    c.model.width_multiplier = a.width
    c.model.sk_ratio = 0.0625 if a.sk else 0.0
    if a.version == 1:
        c.augment.brightness = "additive"  # SimCLR v1's x + U[-0.8s, 0.8s] (impl='simclrv1')
        c.model.num_proj_layers = 2
        c.optim.base_lr = 0.3
        c.optim.lr_scaling = "linear"
        c.optim.weight_decay = 1e-6
        c.num_epochs = 100.0
    else:
        c.model.num_proj_layers = 3
        c.optim.base_lr = 0.1
        c.optim.lr_scaling = "sqrt"
        c.optim.weight_decay = 1e-4
        c.num_epochs = 800.0
        c.memory.enabled = True  # SimCLRv2's MoCo-style memory: 64K queue, EMA decay 0.999.
        c.memory.size = 65536
        c.memory.ema_decay = 0.999
    return base.lock(c)
