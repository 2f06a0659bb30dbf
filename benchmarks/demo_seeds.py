"""`make demo` over several seeds: the mean and spread of every number the README quotes.

    python benchmarks/demo_seeds.py [--seeds=0,1,2] [--out=demo_seeds]

Runs `python -m simclr_jax.demo --config.seed=S --workdir=OUT/seed_S` for each seed, one after
the other (a finished seed is reused: the demo skips finished stages), then prints one markdown
table (mean, sample standard deviation, min and max over the seeds, in percent and minutes) and
writes it with every seed's summary to OUT/seeds.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simclr_jax.demo import SUMMARY_KEYS  # noqa: E402  (imports nothing heavy)

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the pretraining (and of the label subsets).")
flags.DEFINE_string("out", "demo_seeds", "Each seed's demo workdir goes under this folder.")
FLAGS = flags.FLAGS
ROWS = [
    ("linear on SimCLR features, 60,000 labels", "linear_simclr_all"),
    ("linear on raw pixels, 60,000 labels", "linear_pixels_all"),
    ("linear on SimCLR features, 600 labels", "linear_simclr_1pct"),
    ("linear on raw pixels, 600 labels", "linear_pixels_1pct"),
    ("fine-tuned (LP-FT from the head's input), 600 labels", "finetune_1pct"),
    ("same network from scratch, 600 labels", "scratch_1pct"),
    ("student distilled from the fine-tuned network", "distill_1pct"),
    ("kNN (k=200) on SimCLR features", "knn_simclr"),
    ("online linear probe, end of pretraining", "probe_final"),
]
DIFFERENCES = [
    ("SimCLR - pixels, 60,000 labels", "linear_simclr_all", "linear_pixels_all"),
    ("SimCLR - pixels, 600 labels", "linear_simclr_1pct", "linear_pixels_1pct"),
    ("fine-tuned - scratch, 600 labels", "finetune_1pct", "scratch_1pct"),
    ("student - teacher", "distill_1pct", "finetune_1pct"),
    ("offline linear - online probe", "linear_simclr_all", "probe_final"),
]
MINUTES = [("pretraining, minutes", "pretrain_minutes"), ("whole demo, minutes", "total_minutes")]


def run_seed(seed: str, out: Path) -> dict:
    workdir = out / f"seed_{seed}"
    summary = workdir / "summary.json"
    if not summary.exists():
        command = [sys.executable, "-m", "simclr_jax.demo", f"--config.seed={seed}",
                   f"--workdir={workdir}"]  # fmt: skip
        subprocess.run(command, check=True, cwd=ROOT)
    values = json.loads(summary.read_text())
    missing = set(SUMMARY_KEYS) - set(values)
    if missing:
        raise ValueError(f"{summary} lacks {sorted(missing)}: rerun that seed's demo")
    return values


def stats(values: list[float], scale: float) -> str:
    scaled = [scale * v for v in values]
    spread = statistics.stdev(scaled) if len(scaled) > 1 else 0.0
    return (f"{statistics.mean(scaled):.2f} | {spread:.2f} | {min(scaled):.2f} | "
            f"{max(scaled):.2f}")  # fmt: skip


def table(summaries: list[dict]) -> str:
    lines = [f"| over seeds {', '.join(str(s['seed']) for s in summaries)} | mean | sd | min | max |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, key in ROWS:
        lines.append(f"| {name}, % | {stats([s[key] for s in summaries], 100)} |")
    for name, a, b in DIFFERENCES:
        lines.append(f"| {name}, points | {stats([s[a] - s[b] for s in summaries], 100)} |")
    for name, key in MINUTES:
        lines.append(f"| {name} | {stats([s[key] for s in summaries], 1)} |")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    out = Path(FLAGS.out)
    os.makedirs(out, exist_ok=True)
    summaries = [run_seed(seed, out) for seed in FLAGS.seeds]
    text = table(summaries)
    (out / "seeds.json").write_text(json.dumps({"summaries": summaries, "table": text}, indent=1))
    print(text)


if __name__ == "__main__":
    app.run(main)
