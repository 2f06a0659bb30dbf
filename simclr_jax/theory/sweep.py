"""The experiment grid: supervised training vs SimCLR pretraining + fine-tuning.

One jitted, ``jax.vmap``-ed call trains every (SNR, seed) pair of one grid cell shape at once. The
random numbers depend on the seed only (common random numbers): every SNR sees the same noise, the
same labels and the same initial filters, and the supervised and SimCLR runs of a seed share their
labelled training and test sets; the signal norm is the only thing that changes along the SNR axis.
Labelled sets for smaller ``n`` are prefixes of the one for the largest ``n`` (same for ``n_0``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.theory import contrastive, data_model, network, supervised

# Stream ids folded into a seed's key, one per independent source of randomness.
_LABELLED, _TEST, _INIT, _UNLABELLED, _PRETRAIN_INIT, _SPLIT = range(6)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of the experiment (the CLI exposes each one as ``--field``)."""

    # Data model.
    dim: int = 1000
    sigma_p: float = 1.0
    random_patch_order: bool = False
    n_test: int = 1000
    # Network.
    q: float = 3.0
    filters_per_sign: int = 10
    # Supervised training and fine-tuning: full-batch GD on the summed logistic loss.
    sigma0: float = 1e-4
    lr: float = 0.02
    steps: int = 600
    eval_every: int = 10
    # Grids.
    snr_grid: tuple[float, ...] = (0.07, 0.1, 0.14, 0.2, 0.25, 0.3, 0.35, 0.42, 0.5, 0.6, 0.7, 0.85)
    n_grid: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)
    seeds: int = 4
    # SimCLR pretraining (unlabeled) and the fine-tuning hand-over.
    n0_grid: tuple[int, ...] = (32, 128, 512)
    simclr_n_grid: tuple[int, ...] = (2, 4, 8, 16)
    pretrain_sigma0: float = 1e-6
    pretrain_rate: float = 0.5
    pretrain_steps: int = 60
    temperature: float = 1.0
    augmentation: str = "fresh"
    augmentation_strength: float = 0.0
    finetune_rms: float = 1.0
    # Augmentation ablation at (SNR, n_0, n) cells.
    ablation_augmentations: tuple[str, ...] = ("mask", "flip")
    ablation_strengths: tuple[float, ...] = (0.0, 0.3, 0.6, 1.0)
    ablation_snrs: tuple[float, ...] = (0.1, 0.2)
    ablation_n0: int = 512
    ablation_n: int = 8
    # Analysis: a cell "succeeds" when its mean last-iterate test error is below this.
    success_error: float = 0.25

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for settings the experiment cannot run."""
        positive_ints = ("dim", "n_test", "filters_per_sign", "steps", "eval_every", "seeds")
        for name in positive_ints + ("pretrain_steps", "ablation_n0", "ablation_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.q <= 2:
            raise ValueError(f"q must be > 2 (the analysis needs a polynomial ReLU), got {self.q}")
        if self.steps % self.eval_every:
            raise ValueError(f"eval_every ({self.eval_every}) must divide steps ({self.steps})")
        if self.pretrain_steps % 10:
            raise ValueError(f"pretrain_steps must be a multiple of 10, got {self.pretrain_steps}")
        for name in ("snr_grid", "n_grid", "n0_grid", "simclr_n_grid"):
            values = getattr(self, name)
            if not values or min(values) <= 0:
                raise ValueError(
                    f"{name} must be a non-empty list of positive numbers, got {values}"
                )
        if self.augmentation not in data_model.AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {data_model.AUGMENTATIONS}, got {self.augmentation!r}"
            )
        for kind in self.ablation_augmentations:
            if kind not in data_model.AUGMENTATIONS:
                raise ValueError(
                    f"ablation_augmentations entries must be in {data_model.AUGMENTATIONS}, "
                    f"got {kind!r}"
                )
        strengths = (self.augmentation_strength,) + tuple(self.ablation_strengths)
        if not self.ablation_snrs or min(self.ablation_snrs) <= 0:
            raise ValueError(f"ablation_snrs must be positive numbers, got {self.ablation_snrs}")
        if any(not 0.0 <= s <= 1.0 for s in strengths):
            raise ValueError(f"augmentation strengths must lie in [0, 1], got {strengths}")


def default_config() -> Config:
    """The full run (about 3 minutes of CPU time; see README.md for measured wall times)."""
    return Config()


def smoke_config() -> Config:
    """A seconds-scale run that still shows the separation (used by the tests): one label count,
    a low and a high SNR. A larger ``sigma0`` shortens the supervised time scale to fit 100 steps
    in the smaller dimension (memorising noise takes ``~ 1 / (lr sigma0 d^1.5)`` steps)."""
    return Config(
        dim=400,
        n_test=400,
        sigma0=1e-3,
        steps=100,
        snr_grid=(0.15, 0.8),
        n_grid=(4,),
        seeds=2,
        n0_grid=(256,),
        simclr_n_grid=(4,),
        ablation_augmentations=(),
    )


@dataclasses.dataclass(frozen=True)
class _Seeded:
    """Everything one (SNR, seed) run needs besides its method: data, test set, init."""

    mu: jax.Array
    x: jax.Array
    y: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    key: jax.Array


def _seeded(cfg: Config, key: jax.Array, snr: jax.Array, n_max: int) -> _Seeded:
    mu = data_model.signal_vector(cfg.dim, snr, cfg.sigma_p)
    sample = functools.partial(data_model.sample, random_order=cfg.random_patch_order)
    x, y = sample(jax.random.fold_in(key, _LABELLED), n_max, mu, cfg.sigma_p)
    x_test, y_test = sample(jax.random.fold_in(key, _TEST), cfg.n_test, mu, cfg.sigma_p)
    return _Seeded(mu, x, y, x_test, y_test, key)


def _train(cfg: Config, filters0: jax.Array, run: _Seeded, n: int) -> dict[str, jax.Array]:
    history = supervised.train(
        filters0,
        run.x[:n],
        run.y[:n],
        run.x_test,
        run.y_test,
        q=cfg.q,
        lr=cfg.lr,
        steps=cfg.steps,
        eval_every=cfg.eval_every,
    )
    history["final_alignment"] = network.alignment(history.pop("filters"), run.mu).mean()
    return history


def _init_cell(cfg: Config, key: jax.Array) -> jax.Array:
    """The supervised starting filters of a seed (the same for every SNR and n)."""
    init_key = jax.random.fold_in(key, _INIT)
    return network.init_filters(init_key, cfg.filters_per_sign, cfg.dim, cfg.sigma0)


def _pretrain_cell(cfg: Config, n0: int, kind: str, key: jax.Array, snr: jax.Array, strength):
    mu = data_model.signal_vector(cfg.dim, snr, cfg.sigma_p)
    view_a, view_b = data_model.positive_pairs(
        jax.random.fold_in(key, _UNLABELLED),
        n0,
        mu,
        cfg.sigma_p,
        augmentation=kind,
        strength=strength,
        random_order=cfg.random_patch_order,
    )
    history = contrastive.pretrain(
        jax.random.fold_in(key, _PRETRAIN_INIT),
        view_a,
        view_b,
        mu,
        num_filters=2 * cfg.filters_per_sign,
        sigma0=cfg.pretrain_sigma0,
        temperature=cfg.temperature,
        rate=cfg.pretrain_rate,
        steps=cfg.pretrain_steps,
        log_every=cfg.pretrain_steps // 10,
    )
    filters = history["filters"]
    split_key = jax.random.fold_in(key, _SPLIT)
    return {
        "finetune_filters": contrastive.finetune_init(split_key, filters, view_a, cfg.finetune_rms),
        "alignment": network.alignment(filters, mu).mean(),
        "min_alignment": network.alignment(filters, mu).min(),
        "pretrain_loss": history["loss"][-1],
    }


def _train_cell(cfg: Config, n: int, n_max: int, key, snr, filters0):
    """GD on the first ``n`` labelled examples from ``filters0``: the random initialisation for
    supervised training, the pretrained filters for fine-tuning (one compiled program for both)."""
    return _train(cfg, filters0, _seeded(cfg, key, snr, n_max), n)


def _batched(fn: Callable, *static) -> Callable:
    """``jit(vmap(fn))`` over the trailing per-run arguments, with ``static`` ones bound."""
    return jax.jit(jax.vmap(functools.partial(fn, *static)))


def _summaries(history: dict[str, np.ndarray], i: int, cfg: Config) -> dict[str, float]:
    """Best-iterate (oracle early stopping on the test set, each metric its own best) and
    last-iterate numbers of run ``i`` of a batch."""
    test_error, test_loss = history["test_error"][i], history["test_loss"][i]
    return {
        "best_test_error": float(test_error.min()),
        "best_test_loss": float(test_loss.min()),
        "best_step": int((test_error.argmin() + 1) * cfg.eval_every),
        "last_test_error": float(test_error[-1]),
        "last_test_loss": float(test_loss[-1]),
        "train_loss": float(history["train_loss"][i][-1]),
        "train_error": float(history["train_error"][i][-1]),
        "final_alignment": float(history["final_alignment"][i]),
        "diverged": bool(not np.isfinite(history["train_loss"][i]).all()),
    }


def _grid_keys(cfg: Config, snrs) -> tuple[jax.Array, jax.Array, list[tuple[float, int]]]:
    """Flattened (key, snr) batch over ``snrs x seeds`` and its labels."""
    pairs = [(float(s), seed) for s in snrs for seed in range(cfg.seeds)]
    keys = jnp.stack([jax.random.key(seed) for _, seed in pairs])
    return keys, jnp.asarray([s for s, _ in pairs], jnp.float32), pairs


def run_sweep(cfg: Config, log: Callable[[str], None] = print) -> list[dict]:
    """Run the supervised grid, the SimCLR grid and the augmentation ablation; return records."""
    cfg.validate()
    records: list[dict] = []
    n_max = max(max(cfg.n_grid), max(cfg.simclr_n_grid), cfg.ablation_n)
    keys, snrs, pairs = _grid_keys(cfg, cfg.snr_grid)
    train_fns: dict[int, Callable] = {}

    def train(n, batch_keys, batch_snrs, filters):
        if n not in train_fns:
            train_fns[n] = _batched(_train_cell, cfg, n, n_max)
        return jax.device_get(train_fns[n](batch_keys, batch_snrs, filters))

    init_filters = _batched(_init_cell, cfg)(keys)
    for n in cfg.n_grid:
        start = time.perf_counter()
        history = train(n, keys, snrs, init_filters)
        for i, (snr, seed) in enumerate(pairs):
            records.append(
                {"method": "supervised", "snr": snr, "n": n, "seed": seed, "n0": None}
                | _summaries(history, i, cfg)
            )
        log(f"supervised n={n:4d}: {time.perf_counter() - start:5.1f}s")

    for n0 in cfg.n0_grid:
        start = time.perf_counter()
        strengths = jnp.full(snrs.shape, cfg.augmentation_strength)
        pre = _batched(_pretrain_cell, cfg, n0, cfg.augmentation)(keys, snrs, strengths)
        for n in cfg.simclr_n_grid:
            history = train(n, keys, snrs, pre["finetune_filters"])
            for i, (snr, seed) in enumerate(pairs):
                records.append(
                    {
                        "method": "simclr",
                        "snr": snr,
                        "n": n,
                        "seed": seed,
                        "n0": n0,
                        "augmentation": cfg.augmentation,
                        "strength": cfg.augmentation_strength,
                        "alignment": float(pre["alignment"][i]),
                        "min_alignment": float(pre["min_alignment"][i]),
                        "pretrain_loss": float(pre["pretrain_loss"][i]),
                    }
                    | _summaries(history, i, cfg)
                )
        log(f"simclr     n0={n0:4d}: {time.perf_counter() - start:5.1f}s")

    records += _ablation(cfg, train, log)
    return records


def _ablation(cfg: Config, train: Callable, log: Callable) -> list[dict]:
    """Realistic augmentations (positives share part of the noise) at one grid cell."""
    records: list[dict] = []
    strengths = [float(s) for s in cfg.ablation_strengths]
    runs = [
        (snr, s, seed) for snr in cfg.ablation_snrs for s in strengths for seed in range(cfg.seeds)
    ]
    keys = jnp.stack([jax.random.key(seed) for *_, seed in runs])
    snrs = jnp.asarray([snr for snr, *_ in runs], jnp.float32)
    strength_arr = jnp.asarray([s for _, s, _ in runs], jnp.float32)
    for kind in cfg.ablation_augmentations:
        start = time.perf_counter()
        pre = _batched(_pretrain_cell, cfg, cfg.ablation_n0, kind)(keys, snrs, strength_arr)
        history = train(cfg.ablation_n, keys, snrs, pre["finetune_filters"])
        for i, (snr, strength, seed) in enumerate(runs):
            records.append(
                {
                    "method": "simclr_ablation",
                    "snr": float(snr),
                    "n": cfg.ablation_n,
                    "seed": seed,
                    "n0": cfg.ablation_n0,
                    "augmentation": kind,
                    "strength": strength,
                    "alignment": float(pre["alignment"][i]),
                    "min_alignment": float(pre["min_alignment"][i]),
                    "pretrain_loss": float(pre["pretrain_loss"][i]),
                }
                | _summaries(history, i, cfg)
            )
        log(f"ablation   {kind:>6s}: {time.perf_counter() - start:5.1f}s")
    return records


def iter_cells(records: list[dict], **match) -> Iterator[dict]:
    """Records whose fields equal ``match`` (a tiny query helper for analysis and plots)."""
    return (r for r in records if all(r.get(k) == v for k, v in match.items()))
