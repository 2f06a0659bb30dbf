"""Each stage's step as its trainer builds it, with abstract state and batch: what the planner lowers.

The trainers' own `make_stage` builds the pieces (model, schedule, initial state, the per-replica
step) from a StageData; here that StageData comes from the dataset's catalog facts
(stage_data.planned_data) instead of the data, the initial state is traced with `jax.eval_shape`
(no parameter is allocated) and the step is mapped by the runner's own `map_step`. So the program
compiled here is the one `train/runner.py` runs, on any mesh: a topology of compile-only devices
or this machine's CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath

from simclr_jax import accumulation, distill, finetune, parallel, pretrain, saved_run, validation
from simclr_jax.configs import base
from simclr_jax.data import stage_data
from simclr_jax.models import build_model
from simclr_jax.train import checkpoint, runner

STAGES = ("pretrain", "finetune", "distill")


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """A stage's mapped step and abstract arguments, ready to lower, with the facts around it."""

    stage: str
    config: ml_collections.ConfigDict  # as the run would save it (architecture resolved)
    data: stage_data.StageData
    schedule: Any  # optim.TrainSchedule
    model: Any
    mapped: Callable  # runner.map_step's jitted function
    arguments: tuple  # (state, *replicated, batch) as ShapeDtypeStructs with shardings
    notes: tuple[str, ...] = ()
    teacher: Any = None  # distillation: the teacher network

    def lower(self) -> jax.stages.Lowered:
        """Traced as for the mesh's platform: accumulation's chunk loops are unrolled only for a
        CPU (accumulation.loops_unrolled), whatever platform this process runs on."""
        platform = jax.tree.leaves(self.arguments)[0].sharding.mesh.devices.flat[0].platform
        with accumulation.unrolled_loops(platform == "cpu"):
            return self.mapped.lower(*self.arguments)


def stage_of(config: ml_collections.ConfigDict) -> str:
    """'pretrain', 'finetune' or 'distill': which trainer a config belongs to."""
    return base.stage_of(config)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> PlannedStep:
    """The config's stage on `mesh`, from abstract shapes; reads no data and no weights."""
    stage = stage_of(config)
    notes = []
    if config.parallel.backend != "shard_map":
        notes.append(
            f"parallel.backend={config.parallel.backend!r}: planned as 'shard_map' (the same "
            "per-replica step; pmap cannot lower for compile-only devices)"
        )
        config = _with(config, "parallel.backend", "shard_map")
    dp = parallel.DataParallel(mesh, "shard_map")
    batches = ("batch_size",) + ("labeled_batch_size",) * (stage == "distill" and config.alpha > 0)
    devices = mesh.devices.size
    processes = len({device.process_index for device in mesh.devices.flat})
    for name in batches:
        if config[name] <= 0 or config[name] % devices:
            raise ValueError(
                f"{name}={config[name]} does not divide over {devices} devices "
                f"({processes} process(es)); use a multiple of {devices}"
            )
    build_stage = {"pretrain": _pretrain, "finetune": _finetune, "distill": _distill}[stage]
    config, data, built, stage_notes, teacher = build_stage(config, dp)
    # As a resumed run makes it (its restore target): no checkpoint is read, nothing allocated.
    state = jax.eval_shape(lambda: built.init_state(True))
    arguments = (
        _abstract(state, dp.replicated_sharding),
        *(_abstract(extra, dp.replicated_sharding) for extra in built.replicated),
        _abstract(dict(data.batch_shapes), dp.batch_sharding),
    )
    mapped = runner.map_step(
        dp,
        built.step,
        skip_nonfinite=config.nonfinite == "skip",
        num_replicated=len(built.replicated),
    )
    return PlannedStep(
        stage, config, data, built.schedule, built.model, mapped, arguments,
        tuple(notes + stage_notes), teacher,
    )  # fmt: skip


def _pretrain(config, dp):
    validation.validate_pretrain(config)
    data = stage_data.planned_data(config, "pretrain")
    return config, data, pretrain.make_stage(config, dp, data), [], None


def _finetune(config, dp):
    notes = []
    validation.validate_finetune(config)
    run = _readable_run(config.init_checkpoint, "config.init_checkpoint", notes)
    config = saved_run.resolve_model(config, "model", run)
    validation.check_model(config.model, config.dataset.image_size)
    if config.init_classifier_by_linear_fit:  # changes the initial values, not the step
        config = _with(config, "init_classifier_by_linear_fit", False)
    data = stage_data.planned_data(config, "finetune", channels=run and run.channels)
    return config, data, finetune.make_stage(config, dp, data, None), notes, None


def _distill(config, dp):
    notes = []
    validation.validate_finetune(config)
    teacher_run = _readable_run(config.teacher_checkpoint, "config.teacher_checkpoint", notes)
    init_run = _readable_run(config.init_checkpoint, "config.init_checkpoint", notes)
    config = saved_run.resolve_model(config, "student.model", init_run or teacher_run)
    size = config.dataset.image_size
    validation.check_model(config.student.model, size)
    data = stage_data.planned_data(config, "distill", channels=teacher_run and teacher_run.channels)
    if teacher_run is not None:
        teacher = saved_run.build_from_run(teacher_run, dtype=config.dtype)
        teacher_size, teacher_channels = teacher_run.image_size, teacher_run.channels
    else:
        notes.append("no readable teacher: planned as self-distillation (the student's network)")
        teacher = build_model(
            config.student.model, num_classes=data.num_classes, image_size=size, dtype=config.dtype
        )
        teacher_size, teacher_channels = size, data.channels
    teacher_variables = saved_run.abstract_variables(teacher, teacher_size, teacher_channels)
    built = distill.make_stage(config, dp, data, teacher, teacher_variables, None)
    return config, data, built, notes, teacher


def _readable_run(workdir: str, field: str, notes: list[str]) -> saved_run.SavedRun | None:
    """The checkpoint's metadata when `workdir` holds one (architecture, channels), else None."""
    if not workdir or workdir == "none":
        return None
    if "://" not in workdir and not epath.Path(workdir).exists():
        notes.append(f"{field}={workdir!r} is not here: the architecture comes from the config")
        return None
    try:
        return saved_run.read_run(workdir, field=field)
    except (ValueError, checkpoint.CheckpointMismatchError) as error:
        notes.append(f"{field} unreadable ({error}): the architecture comes from the config")
        logging.info("planning without %s: %s", field, error)
        return None


def _with(config: ml_collections.ConfigDict, field: str, value: Any) -> ml_collections.ConfigDict:
    changed = copy.deepcopy(config)
    with changed.unlocked():
        block = changed
        *parents, leaf = field.split(".")
        for name in parents:
            block = block[name]
        block[leaf] = value
    return changed


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
