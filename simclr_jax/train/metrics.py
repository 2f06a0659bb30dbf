"""Metrics and logs: clu writers when TensorFlow is installed, console + JSONL always.

`clu.metric_writers` imports TensorFlow at import time, and GPU boxes often have JAX without TF,
so clu is imported lazily and only when TF is importable. Either way every scalar also goes to
`workdir/metrics.jsonl` (one JSON object per line), so results are machine-readable without
TensorBoard. Importing this module stays cheap: TF is loaded by `create_writer`, not here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"
SLOW_FIRST_STEP_S = 10.0  # Progress says when the first step (compilation) took this long
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


@functools.cache
def clu_metric_writers():
    """`clu.metric_writers`, or None when TensorFlow (which it needs) is not importable."""
    try:
        if importlib.util.find_spec("tensorflow") is None:
            return None
        from clu import metric_writers
    except (ImportError, ValueError):  # ValueError: a module stubbed out in sys.modules
        return None
    metric_writers.MetricWriter.register(JsonlWriter)
    metric_writers.MetricWriter.register(ConsoleWriter)
    return metric_writers


def create_writer(
    workdir: epath.PathLike,
    *,
    is_main: bool = True,
    asynchronous: bool = True,
    tensorboard: bool = True,
    console: bool = True,
):
    """A metric writer: write_scalars(step, dict), write_hparams(dict), flush(), close().

    Main process: TensorBoard events (clu, when `tensorboard` and TF is importable) and
    `workdir/metrics.jsonl`; other processes write no files, so hosts of a pod do not write the
    same ones. Every process: a log line per call, unless `console` is False (the training loop
    writes one line per interval itself: Progress).
    """
    workdir = epath.Path(workdir)
    metric_writers = clu_metric_writers() if tensorboard else None
    if metric_writers is None:
        writers = [ConsoleWriter()] if console else []
        if is_main:
            writers.append(JsonlWriter(workdir / METRICS_FILE))
        return MultiWriter(writers)
    if console:
        writers = [
            metric_writers.create_default_writer(
                workdir, just_logging=not is_main, asynchronous=asynchronous
            )
        ]
    elif is_main:
        events = metric_writers.SummaryWriter(os.fspath(workdir))
        writers = [metric_writers.AsyncWriter(events) if asynchronous else events]
    else:
        writers = []
    if is_main:
        jsonl = JsonlWriter(workdir / METRICS_FILE)
        writers.append(metric_writers.AsyncWriter(jsonl) if asynchronous else jsonl)
    return metric_writers.MultiWriter(writers)


def to_python(value: Any) -> Any:
    """A JSON-ready copy: arrays and numpy/jax scalars become Python numbers or lists."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
        return array.tolist()
    return str(value)


class _NoMedia:
    """The parts of clu's MetricWriter interface that text writers ignore."""

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None) -> None:
        pass

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        pass

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        pass

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None) -> None:
        pass


class JsonlWriter(_NoMedia):
    """Appends {'step': step, name: value, ...} lines to a file; hparams as {'hparams': {...}}.

    Duck-types clu's MetricWriter (and is registered as one when clu loads), so it works with
    and without TensorFlow.
    """

    def __init__(self, path: epath.PathLike):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def _write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()  # a line per log step is cheap; keeps the file current if we crash

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._write({"step": int(step), **to_python(scalars)})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._write({"hparams": to_python(hparams)})

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def format_scalars(scalars: Mapping[str, Any], digits: int = 6) -> str:
    """'name=value, ...' sorted by name, floats to `digits` significant digits."""
    items = sorted(to_python(scalars).items())
    return ", ".join(
        f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}" for k, v in items
    )


class ConsoleWriter(_NoMedia):
    """Scalars and hparams as absl log lines (what clu's LoggingWriter does, without TF)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        logging.info("[%d] %s", step, format_scalars(scalars))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("[Hyperparameters] %s", to_python(hparams))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MultiWriter(_NoMedia):
    """Fans every call out to several writers (clu's MultiWriter, for the no-TF path)."""

    def __init__(self, writers: Sequence[Any]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def format_seconds(seconds: float) -> str:
    """12345.6 -> '3h25m46s'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


class Progress:
    """Reports steps/s, images/s, elapsed time and ETA every `every_steps` steps.

    Call it after each step with the step just finished, and with the interval's training
    metrics where the loop has them: one log line then shows both (the metrics go to the writer's
    files from the loop, the rates from here). It returns True when it reported; metrics given at
    a step that is not a reporting step (a checkpoint's) are reported there too.
    Rates cover the steps since the previous report. The first step after `first_step` compiles
    the program, so the first window starts when it ends: a report at that step has no ETA, and
    the first ETA counts only running steps (after a resume, only the steps still to run).
    Written here rather than with clu's ReportProgress, which needs TensorFlow to import, must be
    called at every single step, and reports neither images/s nor the ETA to the writer.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        writer: Any,
        every_steps: int,
        first_step: int = 0,
        batch_size: int | None = None,
    ):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if total_steps < first_step:
            raise ValueError(f"total_steps ({total_steps}) must be >= first_step ({first_step})")
        self.total_steps = total_steps
        self.every_steps = every_steps
        self.batch_size = batch_size
        self._writer = writer
        self._start_time = self._last_time = time.monotonic()
        self._last_step = self._first_step = first_step

    def __call__(
        self, step: int, now: float | None = None, *, metrics: Mapping[str, Any] | None = None
    ) -> bool:
        due = step % self.every_steps == 0 or step == self.total_steps or metrics is not None
        compiling = step == self._first_step + 1
        if (not due and not compiling) or step <= self._last_step:
            return False
        now = time.monotonic() if now is None else now
        if not due:  # the compiling step: only start the clock (and say so if it was slow)
            if now - self._start_time >= SLOW_FIRST_STEP_S:
                logging.info(
                    "step %d/%d: the first step (it compiles) took %s",
                    step, self.total_steps, format_seconds(now - self._start_time),
                )  # fmt: skip
            self._last_step, self._last_time = step, now
            return False
        steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        scalars = {"steps_per_sec": steps_per_sec, "elapsed_sec": now - self._start_time}
        message = f"{steps_per_sec:.2f} steps/s"
        if self.batch_size:
            scalars["images_per_sec"] = steps_per_sec * self.batch_size
            message += f", {scalars['images_per_sec']:.1f} images/s"
        eta = "after the first step (it compiles)"
        if not compiling:
            scalars["eta_sec"] = (self.total_steps - step) / steps_per_sec
            eta = format_seconds(scalars["eta_sec"])
        shown = {k: v for k, v in (metrics or {}).items() if not (k == "nonfinite" and v == 0)}
        logging.info(
            "step %d/%d (%.1f%%): %s%s, elapsed %s, ETA %s",
            step,
            self.total_steps,
            100 * step / max(self.total_steps, 1),
            f"{format_scalars(shown, digits=4)}; " if shown else "",
            message,
            format_seconds(scalars["elapsed_sec"]),
            eta,
        )
        self._writer.write_scalars(step, scalars)
        self._last_step, self._last_time = step, now
        return True


def drop_steps_after(workdir: epath.PathLike, step: int, *, is_main: bool | None = None) -> int:
    """Removes `workdir/metrics.jsonl` records of steps after `step`; returns how many.

    A run resumed from the checkpoint at `step` trains the steps after it again; their records
    from before the interruption (written since that checkpoint) would otherwise appear twice.
    Call before creating the writer. Only the main process touches the file.
    """
    path = epath.Path(workdir) / METRICS_FILE
    if not _is_main(is_main) or not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if record.get("step", step) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def write_results_json(
    workdir: epath.PathLike,
    metrics: Mapping[str, Any],
    step: int | None = None,
    *,
    is_main: bool | None = None,
) -> epath.Path:
    """Writes {'step': step, **metrics} to workdir/results.json atomically (write, then rename).

    Only the main process writes (default: `jax.process_index() == 0`); others just return the path.
    """
    path = epath.Path(workdir) / RESULTS_FILE
    if not _is_main(is_main):
        return path
    record = {} if step is None else {"step": int(step)}
    record.update(to_python(metrics))
    return _write_atomically(path, json.dumps(record, indent=2))


def read_results_json(workdir: epath.PathLike) -> dict[str, Any] | None:
    """The workdir's results.json as written by write_results_json, or None if there is none."""
    path = epath.Path(workdir) / RESULTS_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_config(
    workdir: epath.PathLike, config: Any, *, is_main: bool | None = None
) -> epath.Path:
    """Writes the resolved run config to workdir/config.json (best-effort JSON), on process 0."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not _is_main(is_main):
        return path
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps(to_python(config), indent=2, sort_keys=True, default=str)
    return _write_atomically(path, text)


def _is_main(is_main: bool | None) -> bool:
    return jax.process_index() == 0 if is_main is None else is_main


def _write_atomically(path: epath.Path, text: str) -> epath.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path
