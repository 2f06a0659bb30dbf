"""An image folder, prepared once into a tfds dataset in ArrayRecord files that training streams.

    prepare_folder(images, data_dir, name=...)  ->  data_dir/NAME/1.0.0/
        NAME-train.array_record-00000-of-00200 ...   read by tfds (`tfds.builder(NAME, data_dir)`)
        dataset_info.json, features.json             tfds's metadata (tfds.folder_dataset)
        prepare.json                                 the record: counts per class, skipped files,
                                                     image sizes seen, what was converted

The work is cut into shards (data/shard_writer.py), written by a pool of processes, one per core.
Until every shard is written the dataset lives in `NAME/1.0.0.prepare/`, with a digest of the
folder (every file's path, size and modification time, and the settings); a rerun on the same
folder writes only the shards that are not done. A changed folder starts over, and says so. Only
at the end is tfds's metadata written and the folder renamed into place, so a half-written dataset
is never mistaken for a finished one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shlex
import shutil
import statistics
import sys
import time

from etils import epath

from simclr_jax.data import folder_layout, shard_writer, sources, tfds_source

RECORD = "prepare.json"
PLAN = "plan.json"
BAD_IMAGES = ("skip", "error")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_COUNTER = None  # a worker's shared progress counter (set by _share_counter)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What decides the dataset's content besides the files (part of the digest)."""

    val_fraction: float = 0.01
    images_per_shard: int = 1000
    bad_images: str = "skip"


def dataset_name(name: str, images: str) -> str:
    """--name, or the folder's own name in snake case; a tfds-style name no other source claims."""
    chosen = name or re.sub(r"[^a-z0-9]+", "_", epath.Path(images).name.lower()).strip("_")
    if not _NAME.match(chosen):
        raise ValueError(
            f"--name={chosen!r} is not a dataset name: use lowercase letters, digits and _, "
            "starting with a letter"
        )
    tfds = tfds_source.import_tfds_library()
    try:
        tfds.builder_cls(chosen)
    except tfds.core.registered.DatasetNotFoundError:
        taken = chosen in sources.LOCAL_DATASETS or chosen == "folder"
    else:
        taken = True
    if taken:
        raise ValueError(f"--name={chosen!r} is the name of a known dataset: choose another --name")
    return chosen


def digest(images: str, layout: folder_layout.Layout, settings: Settings) -> str:
    """sha256 of the settings and of every file's split, label, path, size and mtime."""
    root, hasher = epath.Path(images), hashlib.sha256()
    hasher.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for split, files in sorted(layout.splits.items()):
        for path, label in files:
            stat = (root / path).stat()
            hasher.update(f"{split}\0{label}\0{path}\0{stat.length}\0{stat.mtime}\n".encode())
    return hasher.hexdigest()


def prepare_folder(
    images: str,
    data_dir: str,
    *,
    name: str = "",
    settings: Settings = Settings(),
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Prepare (or finish preparing) `images` as data_dir/NAME; returns the record (prepare.json).

    workers: processes (0: one per core available to this process; 1: this process only)."""
    started = time.monotonic()
    if settings.bad_images not in BAD_IMAGES:
        raise ValueError(f"--bad_images={settings.bad_images!r}: choose from {list(BAD_IMAGES)}")
    name = dataset_name(name, images)
    layout = folder_layout.scan(images, val_fraction=settings.val_fraction)
    fingerprint = digest(images, layout, settings)
    final = epath.Path(data_dir) / name / shard_writer.VERSION
    if final.exists():
        return _already_prepared(final, fingerprint, images)
    work = final.parent / f"{shard_writer.VERSION}.prepare"
    _start_or_resume(work, fingerprint)
    tasks = shard_writer.plan(layout.splits, settings.images_per_shard)
    done = {task.key for task in tasks if shard_writer.summary_path(work, task).exists()}
    todo = [task for task in tasks if task.key not in done]
    if done:
        logging.info("resuming: %d of %d shards already written", len(done), len(tasks))
    unit = functools.partial(
        _run_unit, images=images, folder=os.fspath(work), name=name,
        class_names=layout.class_names, strict=settings.bad_images == "error",
    )  # fmt: skip
    initial = layout.num_files - sum(len(task.files) for task in todo)
    _run_units(unit, todo, workers=_worker_count(workers), total=layout.num_files,
               initial=initial, progress=progress)  # fmt: skip
    summaries = {task.key: shard_writer.read_summary(work, task) for task in tasks}
    _check_readable(work, images, tasks, summaries)
    record = _record(images, data_dir, name, layout, tasks, summaries, fingerprint)
    record.update(shards_reused=len(done), seconds=round(time.monotonic() - started, 1))
    _finalize(work, final, name, layout, tasks, summaries, record)
    return record


def _worker_count(workers: int) -> int:
    if workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: one per core), got {workers}")
    return workers or len(os.sched_getaffinity(0))


def _already_prepared(final: epath.Path, fingerprint: str, images: str) -> dict:
    record_path = final / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if record.get("digest") != fingerprint:
        raise ValueError(
            f"{final} already holds a dataset prepared from other files or settings than "
            f"{images} now has: remove {final} to prepare it again, or choose another --name"
        )
    logging.info("%s is already prepared from these files: nothing to do", final)
    return record


def _start_or_resume(work: epath.Path, fingerprint: str) -> None:
    plan = work / shard_writer.WORK_FOLDER / PLAN
    if plan.exists() and json.loads(plan.read_text()).get("digest") == fingerprint:
        return
    if work.exists():
        logging.warning(
            "%s holds an unfinished run on other files or settings: starting over", work
        )
        shutil.rmtree(work)
    (work / shard_writer.WORK_FOLDER).mkdir(parents=True)
    plan.write_text(json.dumps({"digest": fingerprint}))


def _share_counter(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def _run_unit(task: shard_writer.ShardTask, **kwargs) -> dict:
    return shard_writer.write_shard(task, counter=_COUNTER, **kwargs)


def _run_units(unit, todo: list, *, workers: int, total: int, initial: int, progress: bool):
    """Every unit of `todo`, on `workers` processes, with a progress bar (files, rate, ETA)."""
    from tqdm import tqdm  # a dependency of tensorflow_datasets

    context = multiprocessing.get_context("spawn")  # forking a process that may hold TF is unsafe
    counter = context.Value("q", 0)
    interval = 1.0 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s
    bar = tqdm(total=total, initial=initial, unit="img", desc="prepare", disable=not progress,
               mininterval=interval, smoothing=0.05)  # fmt: skip
    with bar:
        if workers == 1 or len(todo) <= 1:
            _share_counter(counter)
            for task in todo:
                unit(task)
                bar.update(initial + counter.value - bar.n)
            return
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_share_counter, initargs=(counter,)
        ) as pool:
            pending = {pool.submit(unit, task) for task in todo}
            try:
                while pending:
                    finished, pending = concurrent.futures.wait(
                        pending, timeout=1.0, return_when=concurrent.futures.FIRST_EXCEPTION
                    )
                    for future in finished:
                        future.result()  # a worker's error stops the run here
                    bar.update(initial + counter.value - bar.n)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise


def _size_stats(values: list[int], counts: list[int]) -> dict:
    expanded = sorted(v for v, c in zip(values, counts, strict=True) for _ in range(c))
    return {"min": expanded[0], "median": statistics.median_low(expanded), "max": expanded[-1]}


def _image_sizes(sizes: dict[str, int]) -> dict:
    if not sizes:
        return {}
    pairs = [(tuple(map(int, key.split("x"))), count) for key, count in sizes.items()]
    common = sorted(pairs, key=lambda pair: (-pair[1], pair[0]))[:10]
    return {
        "height": _size_stats([p[0][0] for p in pairs], [p[1] for p in pairs]),
        "width": _size_stats([p[0][1] for p in pairs], [p[1] for p in pairs]),
        "distinct": len(pairs),
        "most_common": [{"size": f"{h}x{w}", "count": c} for (h, w), c in common],
    }


def _record(images, data_dir, name, layout, tasks, summaries, fingerprint) -> dict:
    """prepare.json: what was read, kept, converted and skipped."""
    splits, every = {}, shard_writer.merge(list(summaries.values()))
    for split in layout.splits:
        merged = shard_writer.merge([summaries[t.key] for t in tasks if t.split == split])
        per_class = {
            (layout.class_names[int(k)] if layout.class_names else "unlabelled"): v
            for k, v in sorted(merged["per_class"].items(), key=lambda kv: int(kv[0]))
        }
        splits[split] = {
            "files": len(layout.splits[split]), "examples": merged["examples"],
            "skipped": len(merged["skipped"]), "bytes": merged["bytes"], "per_class": per_class,
            "shards": sum(t.split == split for t in tasks),
        }  # fmt: skip
    use = [f"--config.dataset.{field}={shlex.quote(value)}" for field, value in (
        ("name", name), ("data_dir", os.path.abspath(data_dir)),
        ("eval_split", "validation" if "validation" in splits else ""),
    )]  # fmt: skip
    return {
        "name": name, "version": shard_writer.VERSION, "images": os.path.abspath(images),
        "classes": list(layout.class_names), "channels": 3 if every["channels"].get("3") else 1,
        "splits": splits,
        "skipped": [{"path": path, "reason": why} for path, why in every["skipped"]],
        "ignored_files": list(layout.ignored), "image_sizes": _image_sizes(every["sizes"]),
        "kinds": every["kinds"], "conversions": every["conversions"],
        "use": " ".join(use),
        "digest": fingerprint,
    }  # fmt: skip


def _check_readable(work: epath.Path, images: str, tasks: list, summaries: dict) -> None:
    """A split with nothing readable: one line, and the unfinished work removed."""
    splits = list(dict.fromkeys(task.split for task in tasks))
    for split in splits:
        merged = shard_writer.merge([summaries[t.key] for t in tasks if t.split == split])
        if merged["examples"] == 0:
            shutil.rmtree(work)
            if not any(work.parent.iterdir()):
                work.parent.rmdir()
            path, why = merged["skipped"][0]
            where = "" if len(splits) == 1 else f" of the {split} split"
            raise ValueError(
                f"none of the {len(merged['skipped'])} image files{where} under {images} could "
                f"be read (e.g. {path}: {why}); nothing written"
            )


def _finalize(work, final, name, layout, tasks, summaries, record) -> None:
    """tfds's metadata, the record, then the rename that makes the dataset visible."""
    tfds = tfds_source.import_tfds_library()
    split_infos = [
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[summaries[t.key]["examples"] for t in tasks if t.split == split],
            num_bytes=record["splits"][split]["bytes"],
        )
        for split in layout.splits
    ]
    tfds.folder_dataset.write_metadata(
        data_dir=work, features=shard_writer.features(layout.class_names, record["channels"]),
        split_infos=split_infos, version=shard_writer.VERSION, check_data=False,
        description=f"Prepared by simclr_jax.prepare from {record['images']}.",
    )  # fmt: skip
    (work / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(work / shard_writer.WORK_FOLDER)
    work.rename(final)
    for split, counts in record["splits"].items():
        source, _ = tfds_source.open_data_source(name, split, data_dir=os.fspath(final.parents[1]))
        if len(source) != counts["examples"]:
            raise RuntimeError(f"{final}: tfds reads {len(source)} examples of {split}, not "
                               f"{counts['examples']}")  # fmt: skip
