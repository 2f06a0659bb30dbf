"""The fine-tuning recipes, written once: linear evaluation, SimCLRv2 fine-tuning, from scratch.

Every fine-tuning config (finetune_*.py, transfer_digits.py) applies one of these to a
base.finetune_config() and sets only what its dataset changes (batch, epochs, learning rate).
"""

from collections.abc import Mapping
from typing import Any

RECIPES = ("linear_eval", "semi", "supervised")


def linear_eval(c, *, fraction: float, batch_size: int, epochs: float, weight_decay: float = 0.0):
    """Frozen backbone, a zero-initialised classifier on its features, momentum at 0.1 x B/256,
    local BatchNorm: the reference's linear-evaluation command (CIFAR-10: no weight decay;
    ImageNet: 1e-6)."""
    c.label_fraction = fraction
    c.model.ft_proj_selector = 0
    c.model.fine_tune_after_block = 4
    c.model.zero_init_logits_layer = True
    c.model.global_bn = False
    c.optim.name = "momentum"
    c.optim.base_lr = 0.1
    c.optim.lr_scaling = "linear"
    c.optim.weight_decay = weight_decay
    c.optim.warmup_epochs = 0.0
    c.batch_size = batch_size
    c.num_epochs = epochs


def semi_supervised(c, *, fraction: float, batch_size: int, epochs: float, base_lr: float):
    """SimCLRv2 fine-tuning: every layer, from the first projection-head layer, LARS at
    base_lr x sqrt(B), no weight decay, no warmup, global BatchNorm."""
    c.label_fraction = fraction
    c.model.ft_proj_selector = 1
    c.model.fine_tune_after_block = -1
    c.model.zero_init_logits_layer = True
    c.model.global_bn = True
    c.optim.name = "lars"
    c.optim.base_lr = base_lr
    c.optim.lr_scaling = "sqrt"
    c.optim.weight_decay = 0.0
    c.optim.warmup_epochs = 0.0
    c.batch_size = batch_size
    c.num_epochs = epochs


def supervised(
    c,
    *,
    fraction: float,
    batch_size: int,
    epochs: float,
    architecture: Mapping[str, Any],
    base_lr: float = 0.1,
):
    """The supervised baseline: `architecture` from scratch on the same labels for the same steps
    as semi_supervised(...) with these arguments; LARS, weight decay 1e-4, one warmup epoch."""
    semi_supervised(c, fraction=fraction, batch_size=batch_size, epochs=epochs, base_lr=base_lr)
    c.init_checkpoint = "none"  # random initialisation, said explicitly
    for name, value in architecture.items():
        c.model[name] = value
    c.model.ft_proj_selector = 0
    c.model.zero_init_logits_layer = False
    c.optim.weight_decay = 1e-4
    c.optim.warmup_epochs = 1.0
