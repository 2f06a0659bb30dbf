"""Base configs: every field the trainers read, documented where it is defined.

The files in `configs/` start from these builders and change values; they never add fields. Configs are
locked, so a mistyped field on the command line (`--config.modle.depth=50`) is an error naming it, and
ml_collections rejects a value of the wrong type (`--config.batch_size=big`). Derived values (the scaled
learning rate, the number of steps, warmup steps) are computed by the trainers, never stored here.
"""

from __future__ import annotations

from ml_collections import config_dict

ConfigDict = config_dict.ConfigDict


def dataset_config() -> ConfigDict:
    """Where images come from and what size the network sees."""
    c = ConfigDict()
    # 'fashion_mnist', 'cifar10', 'stl10', 'imagenet2012', any other tfds name, or 'folder' (own images).
    c.name = "fashion_mnist"
    # 'auto': the local Debian files when the dataset has them and they exist, else tfds.
    # 'local': only the local files; 'tfds': tensorflow_datasets; 'folder': an image folder at data_dir.
    c.source = "auto"
    # tfds data_dir, or the root of the image folder ('' = the library's default).
    c.data_dir = ""
    c.train_split = "train"  # split used for training (tfds slicing like 'train[:10%]' works).
    c.eval_split = "test"  # split used for evaluation ('' = no evaluation).
    c.image_size = 28  # side of the square crops the network sees.
    return c


def augment_config() -> ConfigDict:
    """SimCLR augmentations (reference values; applied on the accelerator inside the step)."""
    c = ConfigDict()
    # s: brightness, contrast, saturation 0.8s and hue 0.2s (1.0 ImageNet, 0.5 CIFAR).
    c.color_jitter_strength = 1.0
    c.use_blur = True  # Gaussian blur p=0.5, sigma in [0.1, 2]; off at 32 px and below (reference).
    c.crop_min_area = 0.08  # smallest area fraction of the random-resized crop.
    c.flip = True  # random horizontal flip.
    return c


def model_config() -> ConfigDict:
    """The SimCLR network: ResNet backbone, projection head, classifier (see simclr_jax.models)."""
    c = ConfigDict()
    c.depth = 50  # ResNet depth: 18, 34, 50, 101, 152 or 200.
    c.width_multiplier = 1  # integer channel multiplier (SimCLRv2's 1x/2x/3x).
    c.base_width = 64  # channels of the first block group before the multiplier (64 = standard).
    c.sk_ratio = 0.0  # selective-kernel reduction ratio; 0 = off, SimCLRv2 uses 0.0625.
    c.se_ratio = 0.0  # squeeze-excitation ratio; 0 = off.
    # CIFAR stem (3x3 stride-1 conv, no max-pool); None = automatic (image_size <= 32).
    c.cifar_stem = config_dict.placeholder(bool)
    c.proj_head_mode = "nonlinear"  # 'none', 'linear' or 'nonlinear'.
    c.num_proj_layers = 3  # layers of the nonlinear head (v1: 2, v2: 3).
    c.proj_out_dim = 128  # output width of the projection head.
    c.ft_proj_selector = 0  # classifier input: 0 = backbone output, k = k-th projection layer.
    c.zero_init_logits_layer = False  # start the classifier at zero.
    c.fine_tune_after_block = -1  # freeze stages up to k: -1 none, 0 stem, 1..4 block groups.
    c.bn_momentum = 0.9  # BatchNorm moving-average decay.
    c.bn_epsilon = 1e-5  # BatchNorm epsilon.
    c.global_bn = True  # BatchNorm statistics over all replicas (the reference default).
    return c


def optim_config() -> ConfigDict:
    """Optimizer and learning-rate rule (see simclr_jax.optim)."""
    c = ConfigDict()
    c.name = "lars"  # 'lars', 'momentum', 'adam' or 'adamw'.
    c.base_lr = 0.3  # learning rate before batch scaling.
    c.lr_scaling = "linear"  # 'linear': base_lr * batch / 256; 'sqrt': base_lr * sqrt(batch).
    c.weight_decay = 1e-6  # decoupled weight decay (kernels only; never biases or BatchNorm).
    c.momentum = 0.9  # momentum of LARS / SGD.
    c.trust_coefficient = 1e-3  # LARS trust coefficient (eta).
    c.warmup_epochs = 10.0  # linear warmup length, then cosine decay to zero.
    return c


def pretrain_config() -> ConfigDict:
    """Contrastive pretraining with an online linear probe (simclr_jax.pretrain)."""
    c = ConfigDict()
    c.seed = 0  # seeds initialisation, data order and augmentation (all derived from (seed, step)).
    c.dataset = dataset_config()
    c.augment = augment_config()
    c.model = model_config()
    c.optim = optim_config()

    c.loss = ConfigDict()
    c.loss.temperature = 0.1  # NT-Xent temperature tau.

    c.batch_size = 256  # global batch in images (each gives two views); divides the device count.
    c.eval_batch_size = 1000  # global batch for evaluation (the last batch is padded and masked).
    c.num_epochs = 100.0  # training length in epochs of the training split.
    c.num_steps = 0  # if > 0, overrides num_epochs.
    c.dtype = (
        "float32"  # compute dtype: 'float32' or 'bfloat16' (params, BN stats, loss stay fp32).
    )

    c.parallel = ConfigDict()
    c.parallel.backend = "shard_map"  # 'shard_map' (jax.shard_map under jax.jit) or 'pmap'.

    c.log_every_steps = 50  # metrics to the writers and progress (steps/s, ETA).
    c.checkpoint_every_steps = 1000  # orbax checkpoint period (and one at the end).
    c.keep_checkpoints = 3  # how many checkpoints to keep.
    c.eval_every_steps = 0  # exact linear-probe evaluation on eval_split; 0 = only at the end.
    return c


def lock(config: ConfigDict) -> ConfigDict:
    """Forbid new fields so a mistyped override is an error that names it."""
    config.lock()
    return config
