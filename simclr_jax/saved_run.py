"""Any stage's workdir back into a model: its saved config, its architecture, its weights.

Every trainer saves its resolved config with each checkpoint (and as workdir/config.json), so a
workdir says how to rebuild its network. Fine-tuning reads the pretraining run's architecture from
here (the user names only the workdir), distillation rebuilds its teacher, and `load_encoder`
gives users a feature extractor from a pretraining, fine-tuning or distillation run alike.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from simclr_jax import predict
from simclr_jax.configs import base as base_config
from simclr_jax.models import (
    ARCHITECTURE_FIELDS,
    SimCLRModel,
    build_model,
    init_variables,
    linear_classifier,
)
from simclr_jax.train import checkpoint, metrics

_CLASSIFIER_KERNEL = "params/classifier/kernel"
_CLASSIFIER_NORM = "batch_stats/classifier_norm/mean"  # the online probe's input BatchNorm
_STEM_KERNEL = "params/backbone/stem/conv1/kernel"


class NoCheckpointYetError(ValueError):
    """The workdir holds no finished checkpoint (yet: a run that has just started has none)."""


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """A workdir's newest checkpoint: its step, the config saved with it, its parameter shapes."""

    workdir: str
    step: int
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # 'params/backbone/stem/conv1/kernel' -> shape

    @property
    def stage(self) -> str:
        """'distill', 'finetune' or 'pretrain', from the fields its config has."""
        return base_config.stage_of(self.config)

    @property
    def model_config(self) -> dict[str, Any]:
        """The network's config.model (for a distillation run: its student's)."""
        if self.stage == "distill":
            return dict(self.config["student"]["model"])
        return dict(self.config["model"])

    @property
    def num_classes(self) -> int:
        return self._shape(_CLASSIFIER_KERNEL)[-1]

    @property
    def channels(self) -> int:
        return self._shape(_STEM_KERNEL)[2]

    @property
    def image_size(self) -> int:
        return int(self.config["dataset"]["image_size"])

    def _shape(self, path: str) -> tuple[int, ...]:
        if path not in self.shapes:
            raise checkpoint.CheckpointMismatchError(
                f"checkpoint of {self.workdir} (step {self.step}) has no {path}: not a simclr_jax "
                "model checkpoint"
            )
        return self.shapes[path]


def read_teacher(workdir: str, *, field: str) -> SavedRun:
    """read_run of a fine-tuning or distillation workdir: a pretraining one has no teacher (its
    classifier is the online probe)."""
    run = read_run(workdir, field=field)
    if run.stage == "pretrain":
        raise ValueError(
            f"{field}={workdir!r} is a pretraining workdir: its classifier is the online probe, "
            "not a teacher. Fine-tune it first (python -m simclr_jax.finetune "
            "--config.init_checkpoint=...) and give that finetune workdir"
        )
    return run


RANDOM_INIT = "none"  # the init_checkpoint that asks for random weights, explicitly


def read_start(init_checkpoint: str, *, field: str, required: bool) -> SavedRun | None:
    """The run a stage starts from: None for random weights ('none', or '' unless `required`).

    Fine-tuning requires it: a linear evaluation of a network that was never loaded would report
    a random network's accuracy under the pretrained one's name, without any error."""
    if init_checkpoint == RANDOM_INIT or (not init_checkpoint and not required):
        return None
    if not init_checkpoint:
        raise ValueError(
            f"{field} is not set: name the pretraining workdir to start from "
            f"(--{field}=DIR), or --{field}={RANDOM_INIT} to train from random weights "
            "(as the supervised recipes do)"
        )
    return read_run(init_checkpoint, field=field)


def read_run(workdir: str, *, field: str = "workdir") -> SavedRun:
    """The newest checkpoint of `workdir` (a trainer's workdir or its checkpoints folder).

    `field` names the config field or argument that gave the path, for the error messages.
    """
    if not workdir:
        raise ValueError(f"{field} is empty: name a workdir that holds checkpoints")
    directory = checkpoint.absolute_path(workdir)
    if directory.name != "checkpoints":
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise NoCheckpointYetError(
            f"{field}={workdir!r} holds no checkpoints (no {directory} folder)"
        )
    manager = checkpoint.read_only_manager(directory)
    try:
        step = manager.latest_step()
        if step is None:
            raise NoCheckpointYetError(
                f"{field}={workdir!r}: {directory} holds no finished checkpoint"
            )
        metadata = manager.item_metadata(step)[checkpoint.STATE]
        shapes = checkpoint.flat_shapes(getattr(metadata, "tree", metadata))
        saved_config = None
        if (directory / str(step) / checkpoint.CONFIG).exists():
            args = ocp.args.Composite(**{checkpoint.CONFIG: ocp.args.JsonRestore()})
            saved_config = manager.restore(step, args=args)[checkpoint.CONFIG]
    finally:
        manager.close()
    if saved_config is None:  # older runs: the config.json beside the checkpoints
        config_file = directory.parent / metrics.CONFIG_FILE
        if not config_file.exists():
            raise ValueError(f"{field}={workdir!r}: no saved config (checkpoint or config.json)")
        saved_config = json.loads(config_file.read_text())
    return SavedRun(str(directory.parent), int(step), saved_config, shapes)


def resolve_model_fields(
    requested: Mapping[str, Any], inherited: Mapping[str, Any] | None
) -> dict[str, Any]:
    """config.model of a run that starts from a checkpoint, with every field filled in.

    Precedence: a value set in `requested` (not None) > the checkpoint's `inherited` architecture >
    model_config()'s default. Only architecture fields are inherited; the fine-tuning fields
    (ft_proj_selector, fine_tune_after_block, ...) always come from `requested`.
    """
    defaults = base_config.model_config().to_dict()
    resolved = {}
    for name, value in dict(requested).items():
        if value is None and name in ARCHITECTURE_FIELDS:
            if inherited is not None and name in inherited:
                value = inherited[name]
            else:
                value = defaults.get(name)
        resolved[name] = value
    return resolved


def resolve_model(
    config: ml_collections.ConfigDict, model_path: str, run: SavedRun | None
) -> ml_collections.ConfigDict:
    """A copy of `config` whose model block at `model_path` has every architecture field filled.

    The copy is what the run saves (config.json and with each checkpoint), so its workdir alone
    rebuilds the network (load_encoder, a distillation teacher).
    """
    resolved = copy.deepcopy(config)
    block = resolved
    for name in model_path.split("."):
        block = block[name]
    inherited = run.model_config if run is not None else None
    for name, value in resolve_model_fields(block.to_dict(), inherited).items():
        block[name] = value
    if run is not None and block.cifar_stem is None:  # auto: the checkpoint's image size decided
        block.cifar_stem = run.image_size <= 32
    return resolved


def initial_variables(
    model: SimCLRModel, seed: int, image_size: int, channels: int, run: SavedRun | None
) -> dict[str, Any]:
    """Random variables from `seed`, or a checkpoint's variables with a fresh classifier.

    From a checkpoint only the model variables are read (not the step or the optimizer), checked
    first against the model's shapes, so one of another architecture fails at once
    (checkpoint.CheckpointMismatchError naming the mismatched paths). Only the classifier is then
    initialised: initialising the whole network is one of the largest XLA programs of a run.
    """
    if run is None:
        variables = init_variables(model, seed=seed, image_size=image_size, channels=channels)
        return {k: dict(v) for k, v in variables.items()}
    abstract = abstract_variables(model, image_size, channels)
    target = {
        collection: {k: v for k, v in tree.items() if k != "classifier"}
        for collection, tree in abstract.items()
    }
    variables = checkpoint.restore_weights(run.workdir, target)
    width = abstract["params"]["classifier"]["kernel"].shape[0]
    classifier = linear_classifier(model.num_classes, zero_init=model.zero_init_logits_layer)
    fresh = jax.jit(classifier.init)(jax.random.key(seed), jnp.zeros((1, width), jnp.float32))
    variables["params"] = {**variables["params"], "classifier": fresh["params"]}
    return variables


def abstract_variables(model: SimCLRModel, image_size: int, channels: int) -> dict[str, Any]:
    """Shapes and dtypes of the model's {'params', 'batch_stats'}, without computing anything."""
    dummy = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), dummy)


def build_from_run(run: SavedRun, *, dtype: Any = jnp.float32, **overrides: Any) -> SimCLRModel:
    """The run's network (for distillation runs, the student), for inference: no collectives.
    A pretraining run's probe keeps its input BatchNorm when the checkpoint has one."""
    overrides.setdefault("classifier_input_norm", _CLASSIFIER_NORM in run.shapes)
    return build_model(
        run.model_config,
        num_classes=run.num_classes,
        image_size=run.image_size,
        axis_name=None,
        dtype=dtype,
        **overrides,
    )


def restore_variables(run: SavedRun, model: SimCLRModel) -> dict[str, Any]:
    """{'params', 'batch_stats'} of the run's newest checkpoint, laid out for `model`.

    A checkpoint of another architecture raises checkpoint.CheckpointMismatchError naming the
    parameter paths that differ.
    """
    target = abstract_variables(model, run.image_size, run.channels)
    return checkpoint.restore_weights(run.workdir, target)


def load_encoder(
    workdir: str, *, dtype: Any = jnp.float32
) -> tuple[Callable[[Any, jax.Array], dict[str, jax.Array]], dict[str, Any]]:
    """(apply_fn, variables) for feature extraction from any stage's workdir.

    apply_fn(variables, images) takes uint8 images [B, H, W, C] (or floats in [0, 1]), applies the
    evaluation preprocessing (centre crop above 32 px, resize to the run's image size) and returns
    the model's named outputs in inference mode: 'features' (backbone, pooled), 'block_group1'..,
    'head_0'.., 'projection', 'logits'. For a distillation run the network is the student.
    """
    run = read_run(workdir)
    model = build_from_run(run, dtype=dtype)
    variables = restore_variables(run, model)
    return jax.jit(predict.predict_fn(model, image_size=run.image_size)), variables
