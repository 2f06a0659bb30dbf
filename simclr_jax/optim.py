"""Learning-rate rules and schedules, the optimizers (LARS/momentum/SGD/Adam/AdamW), their masks.

Everything numeric is optax's; this module only chooses, masks and validates, following the
reference SimCLR (tf2/model.py build_optimizer, add_weight_decay):
  lars      LARS with the learning rate inside the momentum buffer; its weight decay (an L2 term
            added to the gradient before the trust ratio and momentum) and trust ratio skip biases
            and BatchNorm parameters; the classifier is decayed but gets no trust ratio.
  momentum  Keras SGD(nesterov=True): v <- m v - lr g; w <- w + m v - lr g (the learning rate
            inside the velocity), with an L2 term on every parameter but BatchNorm's, biases
            included (the reference's loss term wd * sum ||w||^2 / 2 over non-BN weights).
  adam      Adam with that same L2 term, as the reference.
Ours, not the reference's:
  sgd       optax.sgd heavy-ball momentum (v <- m v + g; w <- w - lr v: the learning rate after
            the buffer, no Nesterov) with L2 on kernels only (no biases, no BN).
  adamw     decoupled weight decay on kernels only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

LR_SCALINGS = ("linear", "sqrt")
OPTIMIZERS = ("lars", "momentum", "sgd", "adam", "adamw")
CLASSIFIER = "classifier"


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """The reference's batch-size rule: 'linear' base_lr * B / 256, 'sqrt' base_lr * sqrt(B)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"optim.lr_scaling must be one of {LR_SCALINGS}; got {scaling!r}")


def warmup_cosine_schedule(peak_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at `total_steps` (the reference formula).

    lr(step) = peak * step / warmup                                      for step < warmup
             = peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))   afterwards
    If warmup_steps >= total_steps the run never leaves the warmup line (as the reference formula
    gives), so short smoke runs with epoch-based warmup still work.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive; got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(
            f"warmup_steps (from optim.warmup_epochs) must be >= 0; got {warmup_steps}"
        )
    if warmup_steps >= total_steps:
        return optax.linear_schedule(0.0, peak_lr, transition_steps=warmup_steps)
    if warmup_steps == 0:  # optax's warmup would be a 0-step linear schedule (and log a warning)
        return optax.cosine_decay_schedule(peak_lr, decay_steps=total_steps, alpha=0.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
    """A run's length and learning rate, derived from the config and the data (never stored)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float

    def learning_rate(self, peak_lr: float | None = None) -> optax.Schedule:
        """Warmup + cosine to `peak_lr` (default: the run's scaled rate) over the run's steps."""
        peak = self.peak_lr if peak_lr is None else peak_lr
        return warmup_cosine_schedule(peak, self.total_steps, self.warmup_steps)


def train_schedule(config: Any, num_examples: int | None) -> TrainSchedule:
    """Steps and peak learning rate of a run over `num_examples` training examples (every stage).

    total = num_steps or N * epochs // B + 1 and warmup = round(warmup_epochs * N // B), as the
    reference; a warmup longer than the run never leaves the warmup line (warmup_cosine_schedule).

    config fields read: batch_size, num_steps (> 0 overrides num_epochs), num_epochs and optim's
    base_lr, lr_scaling, warmup_epochs. num_examples None (a streamed split of unknown size)
    needs num_steps and no warmup epochs.
    """
    batch = config.batch_size
    if num_examples is None:
        if not config.num_steps or config.optim.warmup_epochs:
            raise ValueError(
                "the size of the training split is unknown, so epochs cannot be counted: set "
                "num_steps > 0 and optim.warmup_epochs=0"
            )
        num_examples = config.num_steps * batch
    steps_per_epoch = num_examples // batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={batch} exceeds the {num_examples} training examples; lower batch_size"
        )
    # The reference's counts (tf2/model.py get_train_steps, WarmUpAndCosineDecay): the epochs
    # are counted in examples, so a fractional last batch still gets a step, plus one.
    total = config.num_steps or int(num_examples * config.num_epochs // batch + 1)
    warmup = int(round(config.optim.warmup_epochs * num_examples // batch))
    peak = scaled_learning_rate(config.optim.base_lr, batch, config.optim.lr_scaling)
    return TrainSchedule(steps_per_epoch, total, warmup, peak)


def _path_names(path: tuple[Any, ...]) -> list[str]:
    return [jax.tree_util.keystr((key,), simple=True) for key in path]


def _is_batch_norm(names: list[str]) -> bool:
    """A BatchNorm parameter: a module named '*BatchNorm*' or 'bn*', or a normalisation 'scale'."""
    modules, leaf = names[:-1], names[-1]
    return leaf == "scale" or any(
        "batchnorm" in module.lower() or module.lower().startswith("bn") for module in modules
    )


def _decays(names: list[str]) -> bool:
    return names[-1] != "bias" and not _is_batch_norm(names)


def weight_decay_mask(params: Any) -> Any:
    """True for weights (conv/dense kernels, the classifier's included); False for biases and BN.

    Works on any params pytree (dicts or FrozenDicts, with optax.MaskedNode holes), so it can be
    handed to optax as a callable as well as called once on the parameters.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _decays(_path_names(path)), params)


def l2_mask(params: Any) -> Any:
    """True for every parameter but BatchNorm's, biases included: the reference's L2 term for its
    momentum and Adam optimizers covers every weight whose name lacks 'batch_normalization'."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not _is_batch_norm(_path_names(path)), params
    )


def trust_ratio_mask(params: Any) -> Any:
    """Like `weight_decay_mask`, but False under the top-level 'classifier' (no LARS adaptation)."""

    def adapts(path: tuple[Any, ...], _: Any) -> bool:
        names = _path_names(path)
        return _decays(names) and names[0] != CLASSIFIER

    return jax.tree_util.tree_map_with_path(adapts, params)


def _check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
    if callable(learning_rate):
        return
    if not float(learning_rate) > 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate}")


def _base_optimizer(
    optim_config: Any, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    name = optim_config.name
    weight_decay = float(optim_config.get("weight_decay", 0.0))
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0; got {weight_decay}")
    if name == "lars":
        return optax.lars(
            learning_rate,
            weight_decay=weight_decay,
            weight_decay_mask=weight_decay_mask,
            trust_coefficient=optim_config.get("trust_coefficient", 1e-3),
            trust_ratio_mask=trust_ratio_mask,
            momentum=optim_config.get("momentum", 0.9),
        )
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask)
    momentum = optim_config.get("momentum", 0.9)
    if name == "momentum":
        inner, mask = nesterov_momentum(learning_rate, momentum), l2_mask
    elif name == "sgd":
        inner, mask = optax.sgd(learning_rate, momentum=momentum), weight_decay_mask
    elif name == "adam":
        inner, mask = optax.adam(learning_rate), l2_mask
    else:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}; got {name!r}")
    if weight_decay == 0:
        return inner
    # L2: wd * w added to the gradient before the momentum / Adam statistics (the reference's
    # weight decay is a loss term wd * ||w||^2 / 2).
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask), inner)


def nesterov_momentum(
    learning_rate: optax.ScalarOrSchedule, momentum: float
) -> optax.GradientTransformation:
    """Keras SGD(momentum, nesterov=True), the reference's 'momentum' optimizer.

    v <- m v - lr g;  w <- w + m v - lr g. The learning rate is inside the velocity, so a change
    of learning rate does not rescale the momentum already accumulated (optax.sgd's
    w <- w - lr (g + m t) does): scale by -lr first, then the Nesterov trace.
    """
    return optax.chain(
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=True),
    )


def make_optimizer(
    optim_config: Any,
    params: Any,
    *,
    learning_rate: optax.ScalarOrSchedule,
    frozen: Any | None = None,
) -> optax.GradientTransformation:
    """The optimizer named by `optim_config.name` ('lars', 'momentum', 'sgd', 'adam', 'adamw').

    optim_config fields read: name, weight_decay, momentum, trust_coefficient (ml_collections
    ConfigDict or anything with `.name` and `.get`). Masks come from the parameter paths (see
    `weight_decay_mask`, `trust_ratio_mask`).

    frozen: optional pytree of bools over `params` (True = frozen, e.g. models.frozen_mask). Frozen
    parameters get exactly zero updates and no optimizer state (optax.multi_transform with
    set_to_zero), so neither weight decay nor momentum can move them.
    """
    _check_learning_rate(learning_rate)
    optimizer = _base_optimizer(optim_config, learning_rate)
    if frozen is None:
        return optimizer
    try:
        jax.tree.map(lambda _flag, _subtree: None, frozen, params)
    except ValueError as error:
        raise ValueError(
            "frozen must be a pytree of bools with the structure of params (or a prefix of it)"
        ) from error
    labels = jax.tree.map(lambda is_frozen: "frozen" if is_frozen else "trainable", frozen)
    return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def with_separate_probe(
    optimizer: optax.GradientTransformation,
    params: Any,
    *,
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
    """Train the top-level 'classifier' (the online probe) by its own Adam, no weight decay.

    The probe sits on stop-gradient features, so its optimizer never touches the representation.
    Adam's per-parameter step size keeps it an honest monitor whatever the scale of the features
    and whatever the encoder's learning rate (LARS without trust ratio for the classifier, as in
    the reference, makes a linear layer diverge).
    """
    _check_learning_rate(learning_rate)
    if CLASSIFIER not in params:
        raise ValueError(
            f"params have no top-level {CLASSIFIER!r} subtree to give its own optimizer"
        )
    labels = {name: "probe" if name == CLASSIFIER else "model" for name in params}
    probe = optax.adam(learning_rate)
    return optax.multi_transform({"model": optimizer, "probe": probe}, labels)
