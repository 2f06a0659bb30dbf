"""The evaluation job (python -m simclr_jax.evaluate) on real runs: it starts before the first
checkpoint, evaluates each one once while training writes them, and stops after the last."""

import json
import pathlib
import subprocess
import sys
import threading

import pytest

from simclr_jax import evaluate, finetune
from simclr_jax.configs import finetune_fashion_mnist

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_TF = (
    "import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def records(workdir):
    path = pathlib.Path(workdir) / "eval" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pretraining_checkpoints_are_evaluated_once_while_the_run_writes_them(tmp_path):
    outcome = {}

    def job():
        try:
            outcome["results"] = evaluate.evaluate_workdir(str(tmp_path), poll_s=0.2, timeout_s=600)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            outcome["error"] = error

    # The job starts first: the workdir has no checkpoint yet, training writes them meanwhile.
    evaluator = threading.Thread(target=job)
    evaluator.start()
    train = subprocess.run(
        [
            sys.executable, "-c", NO_TF, "simclr_jax.pretrain",
            "--config=configs/pretrain_fashion_mnist.py:tiny",
            f"--workdir={tmp_path}", "--config.num_steps=9", "--config.log_every_steps=3",
            "--config.checkpoint_every_steps=3", "--config.keep_checkpoints=5",
            "--config.dataset.train_split=train[:256]", "--config.dataset.eval_split=test[:200]",
            "--config.eval_batch_size=100", "--config.evals.knn.bank_size=100",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    evaluator.join(timeout=600)
    assert not evaluator.is_alive() and "error" not in outcome, outcome.get("error")

    rows = records(tmp_path)
    assert [row["step"] for row in rows] == [3, 6, 9]  # each checkpoint once, then it stopped
    for row in rows:
        assert set(row) == {"step", "eval_probe_top1", "eval_probe_top5", "eval_probe_loss",
                            "eval_probe_count", "knn_top1", "proj_std",
                            "effective_rank"}  # fmt: skip
        assert row["eval_probe_count"] == 200 and 0 <= row["knn_top1"] <= 1
    # The same numbers as the evaluation inside training at the last step: one builder
    # (train/evaluators.from_config), so the kNN bank is the same class-balanced 100 images.
    trained = json.loads((tmp_path / "results.json").read_text())
    for name in ("eval_probe_top1", "eval_probe_top5", "eval_probe_count", "knn_top1", "proj_std"):
        assert rows[-1][name] == trained[name], name
    assert rows[-1]["eval_probe_loss"] == pytest.approx(trained["eval_probe_loss"], rel=1e-5)
    assert outcome["results"] == rows[-1]
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == rows[-1]


def test_fine_tuned_run_gets_exact_top1_and_top5_and_a_rerun_adds_nothing(tmp_path):
    config = finetune_fashion_mnist.get_config("tiny_supervised")
    config.num_steps = 4
    config.checkpoint_every_steps = 2
    config.dataset.eval_split = "test[:300]"
    config.eval_batch_size = 100
    trained = finetune.train_and_evaluate(config, str(tmp_path))
    results = evaluate.evaluate_workdir(str(tmp_path), poll_s=0.05, timeout_s=60)
    rows = records(tmp_path)
    assert [row["step"] for row in rows] == [2, 4]
    for name in ("eval_top1", "eval_top5", "eval_count"):
        assert rows[-1][name] == trained[name], name
    assert rows[-1]["eval_count"] == 300 and results == rows[-1]
    assert evaluate.evaluate_workdir(str(tmp_path), poll_s=0.05, timeout_s=60) == results
    assert len(records(tmp_path)) == 2
