"""`make demo`: SimCLR on real Fashion-MNIST on this machine's CPU, against raw pixels and scratch.

    python -m simclr_jax.demo [--workdir=demo_out] [--config.seed=1] [--config.num_epochs=4 ...]
    python -m simclr_jax.demo --sweep        # `make demo-sweep`: 60 / 600 / 6,000 / 60,000 labels

1. Pretrain the demo preset of configs/pretrain_fashion_mnist.py (the CPU-shaped
   convnet) on one JAX device per core (parallel.use_cpu_devices).
2. Its frozen features against the raw pixels: the same logistic regression on both, its L2
   penalty chosen on held-out training labels for each (train/linear_fit.py), with 600 (1%) and
   60,000 labels; and the kNN accuracy of the features (k=200, cosine, temperature 0.1).
3. Fine-tune on the 600 labels by LP-FT from the projection head's input (the classifier on the
   backbone output, started at its logistic regression: finetune_fashion_mnist.py), against the
   same network trained from scratch on the same labels for the same steps (its own tuned
   learning rate).
4. Distill the fine-tuned network into a student on the 60,000 training images, labels unread.

It prints one table and writes, under --workdir: summary.json (the keys of SUMMARY_KEYS; accuracies
as fractions), curves.png (the pretraining curves), label_efficiency.png, neighbors.png, map.png,
retrieval.json and embeddings_test.npz (demo_embedding.py), features.json and pixels.json (the
linear fits, kept for a rerun), and each stage's workdir. Rerunning resumes or skips finished
stages and reads the fits back. --sweep adds fine-tuning, scratch and linear rows at
60, 6,000 and 60,000 labels (sweep.json), which label_efficiency.png then shows too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
from absl import flags
from ml_collections import config_flags

from simclr_jax import cli, demo_embedding, parallel
from simclr_jax.configs import pretrain_fashion_mnist
from simclr_jax.train.task_progress import TaskProgress

FLAGS = flags.FLAGS
FEW = 0.01  # the few-label setting of the table: 1% of the training labels (600)
SWEEP = (0.001, 0.01, 0.1, 1.0)  # --sweep: 60, 600, 6,000 and 60,000 labels
SUMMARY_KEYS = (
    "linear_simclr_all", "linear_simclr_1pct", "linear_pixels_all", "linear_pixels_1pct",
    "finetune_1pct", "scratch_1pct", "distill_1pct", "knn_simclr", "probe_final",
    "recall_at_1", "recall_at_5", "recall_at_10", "map_at_r", "embedding_seconds",
    "pretrain_minutes", "seed", "total_minutes",
)  # fmt: skip
INSTALL_HINT = (
    "the Fashion-MNIST files are not installed (Debian's dataset-fashion-mnist, under "
    "/usr/share/datasets/fashion-mnist): run `make data`, or `sudo apt-get install "
    "dataset-fashion-mnist`, or put the four files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a "
    "folder and add --config.dataset.data_dir=FOLDER"
)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Fashion-MNIST's uint8 images [N, 28, 28, 1] and labels, both splits."""

    train_images: Any
    train_labels: Any
    test_images: Any
    test_labels: Any


def load_splits(config) -> Splits:
    """Both splits from the local files; their absence is a one-line error, never a download."""
    from simclr_jax.data import fashion_mnist, sources

    if not fashion_mnist.available(config.dataset.data_dir):
        raise FileNotFoundError(INSTALL_HINT)
    train = sources.load_split(config.dataset, config.dataset.train_split)
    test = sources.load_split(config.dataset, config.dataset.eval_split)
    return Splits(train.images, train.labels, test.images, test.labels)


def run_stage(
    name: str, train_and_evaluate, config, workdir: str, *, accept_config_changes=None
) -> tuple[dict[str, Any], float]:
    """Run (or resume, or find finished) a stage: its results and the minutes this call took.

    A stage stopped by SIGTERM or Ctrl-C saves and returns: then the demo stops too (the next
    stages would start from an unfinished one). accept_config_changes None: the flag's value."""
    start = time.time()
    logging.info("Demo stage: %s (%s)", name, workdir)
    if accept_config_changes is None:
        accept_config_changes = FLAGS.accept_config_changes
    results = train_and_evaluate(config, workdir, accept_config_changes=accept_config_changes)
    if "preempted_at_step" in results:
        raise RuntimeError(
            f"stopped during the {name} stage at step {results['preempted_at_step']}, with a "
            "checkpoint: rerun the same command to go on from there"
        )
    return results, (time.time() - start) / 60


def embed(workdir: str, images, batch: int = 2000):
    """Backbone features of uint8 images from a run's checkpoint (BN in inference mode)."""
    import jax.numpy as jnp
    import numpy as np

    from simclr_jax.saved_run import load_encoder

    apply_fn, variables = load_encoder(workdir)
    progress = TaskProgress("Features of the images", len(images), unit=" images")
    chunks = []
    for i in range(0, len(images), batch):
        chunks.append(
            np.asarray(apply_fn(variables, jnp.asarray(images[i : i + batch]))["features"])
        )
        progress.advance(len(chunks[-1]))
    return np.concatenate(chunks)


def linear_accuracy(train_x, train_y, test_x, test_y, labels: int, seed: int) -> float:
    """Test accuracy of logistic regression on `labels` class-stratified training examples, its
    L2 penalty chosen on held-out folds of those examples (linear_fit.fit_within_budget)."""
    from simclr_jax.data.label_fraction import stratified_subset
    from simclr_jax.train.linear_fit import fit_within_budget

    chosen = stratified_subset(train_y, labels / len(train_y), seed=seed)
    classifier = fit_within_budget(train_x[chosen], train_y[chosen], num_classes=10, seed=seed)
    return classifier.accuracy(test_x, test_y)


def feature_scores(out: str, pretrain_dir: str, step: int, splits: Splits, counts, seed: int):
    """What the pretrained features score: kNN, retrieval (with the neighbours and map pictures)
    and the linear fits at each label count. Kept in out/features.json with the checkpoint's step
    and the seed, so a rerun of a finished demo reads them back instead of fitting again."""
    from simclr_jax.train import scoring

    path = os.path.join(out, "features.json")
    key = {"pretrain_step": step, "seed": seed, "label_counts": sorted(counts.values())}
    if os.path.exists(path):
        with open(path) as file:
            saved = json.load(file)
        if saved.get("key") == key:
            saved["linear"] = {int(k): v for k, v in saved["linear"].items()}
            return saved
    train_x = embed(pretrain_dir, splits.train_images)
    test_x = embed(pretrain_dir, splits.test_images)
    knn = float(
        scoring.knn_evaluate(
            train_x, splits.train_labels, test_x, splits.test_labels, num_classes=10
        )
    )
    retrieval, seconds = demo_embedding.embedding_outputs(out, splits, train_x, test_x, seed)
    linear = {
        count: float(
            linear_accuracy(train_x, splits.train_labels, test_x, splits.test_labels, count, seed)
        )
        for count in counts.values()
    }
    scores = {
        "key": key, "knn": knn, "retrieval": retrieval, "embedding_seconds": seconds,
        "linear": linear, "feature_dim": int(train_x.shape[1]),
    }  # fmt: skip
    with open(path, "w") as file:
        json.dump(scores, file, indent=1)
    return scores


def pixel_accuracies(out: str, splits: Splits, label_counts, seed: int) -> dict[int, float]:
    """The raw-pixel baseline at each label count, kept in out/pixels.json (it never changes for
    a seed, so a rerun does not fit it again)."""
    import numpy as np

    path = os.path.join(out, "pixels.json")
    saved = {}
    if os.path.exists(path):
        with open(path) as file:
            saved = {int(k): v for k, v in json.load(file).get(str(seed), {}).items()}
    flat = lambda images: images.reshape(len(images), -1).astype(np.float32)  # noqa: E731
    for labels in label_counts:
        if labels not in saved:
            saved[labels] = linear_accuracy(
                flat(splits.train_images), splits.train_labels,
                flat(splits.test_images), splits.test_labels, labels, seed,
            )  # fmt: skip
    with open(path, "w") as file:
        json.dump({str(seed): {str(k): v for k, v in sorted(saved.items())}}, file, indent=1)
    return saved


def follow_pretraining(config, pretrain_config) -> None:
    """A stage's config reads the pretraining's splits, seeds and TensorBoard switch (the tests
    run on a slice; `--config.tensorboard=False` turns the event files off for every stage)."""
    config.dataset.train_split = pretrain_config.dataset.train_split
    config.dataset.eval_split = pretrain_config.dataset.eval_split
    config.dataset.data_dir = pretrain_config.dataset.data_dir
    config.seed = config.label_seed = pretrain_config.seed
    config.tensorboard = pretrain_config.tensorboard


def few_label_runs(out: str, pretrain_config, fraction: float, labels: int) -> dict[str, Any]:
    """Fine-tuned (the demo's semi recipe) vs from scratch on `labels` labels (same steps)."""
    from simclr_jax import finetune
    from simclr_jax.configs import finetune_fashion_mnist

    arg = f"fraction={fraction},size={FLAGS.size}"
    tuned_config = finetune_fashion_mnist.get_config(f"recipe=semi,{arg}")
    tuned_config.init_checkpoint = os.path.join(out, "pretrain")
    scratch_config = finetune_fashion_mnist.get_config(f"recipe=supervised,{arg}")
    for c in (tuned_config, scratch_config):
        follow_pretraining(c, pretrain_config)
    tuned, tuned_minutes = run_stage(
        f"fine-tune on {labels} labels", finetune.train_and_evaluate, tuned_config,
        os.path.join(out, f"finetune_{labels}"),
    )  # fmt: skip
    scratch, scratch_minutes = run_stage(
        f"from scratch on {labels} labels", finetune.train_and_evaluate, scratch_config,
        os.path.join(out, f"scratch_{labels}"),
    )  # fmt: skip
    return dict(tuned=tuned, tuned_minutes=tuned_minutes, scratch=scratch,
                scratch_minutes=scratch_minutes)  # fmt: skip


def distill_run(out: str, pretrain_config, labels: int) -> tuple[dict[str, Any], float]:
    """The 1% fine-tuned network teaches a student (from the SimCLR weights) on every image."""
    from simclr_jax import distill
    from simclr_jax.configs import distill_fashion_mnist

    config = distill_fashion_mnist.get_config(f"size={FLAGS.size}")
    follow_pretraining(config, pretrain_config)
    config.label_fraction = FEW
    config.teacher_checkpoint = os.path.join(out, f"finetune_{labels}")
    config.init_checkpoint = os.path.join(out, "pretrain")
    return run_stage("distill", distill.train_and_evaluate, config, os.path.join(out, "distill"))


def figures(out: str, pretrain_dir: str, rows: dict[str, dict[int, float]]) -> None:
    from simclr_jax import plot

    plot.plot_training_curves(pretrain_dir, os.path.join(out, "curves.png"))
    plot.plot_label_efficiency(
        rows,
        os.path.join(out, "label_efficiency.png"),
        title="Fashion-MNIST test accuracy against labels (CPU demo)",
    )


def label_efficiency_rows(out: str, current: dict[str, dict[int, float]]):
    """This run's points, merged with a sweep's (out/sweep.json) where one was made."""
    rows = {name: dict(points) for name, points in current.items()}
    path = os.path.join(out, "sweep.json")
    if os.path.exists(path):
        with open(path) as file:
            for name, points in json.load(file).items():
                rows.setdefault(name, {}).update({int(k): v for k, v in points.items()})
    return rows


def main(argv) -> None:
    del argv
    started = time.time()
    logging.getLogger().setLevel(logging.INFO)
    config = FLAGS.config
    seed, out = config.seed, FLAGS.workdir
    splits = load_splits(config)  # before anything slow: a missing package fails in seconds
    from simclr_jax import pretrain

    os.makedirs(out, exist_ok=True)
    pretrain_dir = os.path.join(out, "pretrain")
    pretrained, pretrain_minutes = run_stage(
        "pretrain", pretrain.train_and_evaluate, config, pretrain_dir
    )
    num_train = len(splits.train_labels)
    fractions = SWEEP if FLAGS.sweep else (FEW, 1.0)
    counts = {fraction: round(fraction * num_train) for fraction in fractions}
    scores = feature_scores(out, pretrain_dir, int(pretrained["step"]), splits, counts, seed)
    linear, knn, retrieval = scores["linear"], scores["knn"], scores["retrieval"]
    embedding_seconds = scores["embedding_seconds"]
    pixels = pixel_accuracies(out, splits, counts.values(), seed)
    runs = {
        counts[f]: few_label_runs(out, config, f, counts[f])
        for f in (SWEEP if FLAGS.sweep else (FEW,))
    }
    student, distill_minutes = distill_run(out, config, counts[FEW])

    few = runs[counts[FEW]]
    summary = _summary(
        linear, pixels, few, student, pretrained, counts, num_train,
        knn=knn, retrieval=retrieval, embedding_seconds=embedding_seconds,
        pretrain_minutes=pretrain_minutes, seed=seed,
    )  # fmt: skip
    current = {
        "SimCLR, fine-tuned": {k: r["tuned"]["eval_top1"] for k, r in runs.items()},
        "SimCLR, linear": linear,
        "supervised from scratch": {k: r["scratch"]["eval_top1"] for k, r in runs.items()},
        "raw pixels, linear": pixels,
    }
    if FLAGS.sweep:
        with open(os.path.join(out, "sweep.json"), "w") as file:
            json.dump(current, file, indent=1)
    figures(out, pretrain_dir, label_efficiency_rows(out, current))
    summary["total_minutes"] = (time.time() - started) / 60
    with open(os.path.join(out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=1)
    print_table(
        summary, pretrained, few, student, scores["feature_dim"], counts, len(splits.test_labels)
    )


def _summary(linear, pixels, few, student, pretrained, counts, num_train, **extra) -> dict:
    """summary.json's numbers (README and RESULTS read them): every accuracy of the table."""
    retrieval = extra.pop("retrieval")
    return {
        "linear_simclr_all": linear[num_train],
        "linear_simclr_1pct": linear[counts[FEW]],
        "linear_pixels_all": pixels[num_train],
        "linear_pixels_1pct": pixels[counts[FEW]],
        "finetune_1pct": few["tuned"]["eval_top1"],
        "scratch_1pct": few["scratch"]["eval_top1"],
        "distill_1pct": student["eval_top1"],
        "knn_simclr": extra.pop("knn"),
        "probe_final": pretrained.get("eval_probe_top1"),
        **{f"recall_at_{k}": retrieval[f"recall@{k}"] for k in (1, 5, 10)},
        "map_at_r": retrieval["map@r"],
        **extra,
    }


def print_table(summary, pretrained, few, student, dims: int, counts, test_count: int) -> None:
    import jax

    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    device = f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)"
    print(
        f"\nSimCLR on Fashion-MNIST ({device}, seed {summary['seed']}); "
        f"test accuracy on {test_count:,} images"
    )
    print(
        f"Pretraining: {pretrained['step']} steps in {summary['pretrain_minutes']:.1f} min; "
        f"whole demo {summary['total_minutes']:.1f} min\n"
    )
    all_labels, few_labels = f"{counts[1.0]:,}", f"{counts[FEW]:,}"
    print(f"| linear classifier on | dims | all {all_labels} labels | {few_labels} labels (1%) |")
    print("|---|---|---|---|")
    print(f"| SimCLR features | {dims} | {pct(summary['linear_simclr_all'])} | "
          f"{pct(summary['linear_simclr_1pct'])} |")  # fmt: skip
    print(f"| raw pixels | 784 | {pct(summary['linear_pixels_all'])} | "
          f"{pct(summary['linear_pixels_1pct'])} |\n")  # fmt: skip
    print(f"| with {few_labels} labels (1%) | steps | test top-1 |")
    print("|---|---|---|")
    for name, result in [
        ("SimCLR, fine-tuned (LP-FT from the head's input)", few["tuned"]),
        ("same network from scratch, same labels and steps", few["scratch"]),
        ("student distilled from the fine-tuned network (no labels)", student),
    ]:
        print(f"| {name} | {result['step']} | {pct(result['eval_top1'])} |")
    probe = summary["probe_final"]
    print(f"\nkNN (k=200) on the SimCLR features: {pct(summary['knn_simclr'])}; online probe at "
          f"the end of pretraining: {pct(probe) if probe is not None else 'n/a'}")  # fmt: skip
    print(f"Retrieval, test images among the training images: recall@1 "
          f"{pct(summary['recall_at_1'])}, @5 {pct(summary['recall_at_5'])}, @10 "
          f"{pct(summary['recall_at_10'])}, mAP@R {pct(summary['map_at_r'])} "
          f"(neighbors.png, map.png, {summary['embedding_seconds']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    # A CPU demo: no probing for accelerator plugins (a GPU or TPU build of jaxlib prints its
    # search) unless JAX_PLATFORMS says otherwise; then one device per core, before JAX starts.
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    parallel.use_cpu_devices()
    config_flags.DEFINE_config_file(
        "config",
        f"{pretrain_fashion_mnist.__file__}:demo",
        cli.config_help(
            "Pretraining config of the demo (default: pretrain_fashion_mnist:demo)", "pretrain"
        ),  # fmt: skip
        lock_config=True,
    )
    flags.DEFINE_string("workdir", "demo_out", "Each stage's workdir goes under this folder.")
    flags.DEFINE_bool("sweep", False, "Also 0.1%, 10% and 100% of the labels (make demo-sweep).")
    flags.DEFINE_enum(
        "size", "demo", ["demo", "tiny"], "Size of the fine-tuning and distillation presets."
    )
    flags.DEFINE_bool(
        "accept_config_changes",
        False,
        "Resume the stages' workdirs although the config changes the runs (see the README).",
    )
    cli.run(main)
