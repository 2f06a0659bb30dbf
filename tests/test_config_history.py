"""Comparing a workdir's saved config with a resumed run's: altering changes refused, all recorded."""

import json

import pytest

from simclr_jax.train import config_history
from simclr_jax.train.config_history import ConfigChangedError

SAVED = {
    "batch_size": 256,
    "seed": 0,
    "log_every_steps": 50,
    "optim": {"name": "lars", "base_lr": 0.3},
    "dataset": {"name": "cifar10", "data_dir": "/data", "eval_split": "test"},
    "parallel": {"backend": "shard_map"},
}


def changed(**updates):
    new = json.loads(json.dumps(SAVED))
    for dotted, value in updates.items():
        *parents, leaf = dotted.split("__")
        node = new
        for name in parents:
            node = node[name]
        node[leaf] = value
    return new


def test_differences_are_dotted_paths_with_both_values():
    new = changed(batch_size=512, optim__base_lr=0.1)
    new["memory"] = {"enabled": True}
    assert config_history.differences(SAVED, new) == {
        "batch_size": (256, 512),
        "memory.enabled": ("(absent)", True),
        "optim.base_lr": (0.3, 0.1),
    }
    assert config_history.differences(SAVED, json.loads(json.dumps(SAVED))) == {}


def test_altering_change_is_an_error_naming_fields_and_the_flag(tmp_path):
    new = changed(batch_size=512, seed=3, log_every_steps=10)
    with pytest.raises(ConfigChangedError) as error:
        config_history.check_resume(tmp_path, SAVED, new, step=20, is_main=True)
    message = str(error.value)
    assert "batch_size 256 -> 512" in message and "seed 0 -> 3" in message
    assert "log_every_steps" not in message  # free: not part of the complaint
    assert "--accept_config_changes" in message and "step 20" in message
    assert "\n" not in message
    assert not (tmp_path / config_history.HISTORY_FILE).exists()


@pytest.mark.parametrize(
    "field,value",
    [("log_every_steps", 5), ("dataset__data_dir", "gs://b/tfds"), ("parallel__backend", "pmap")],
)
def test_free_changes_pass_and_are_recorded(tmp_path, field, value):
    changes = config_history.check_resume(
        tmp_path, SAVED, changed(**{field: value}), step=7, is_main=True
    )
    path = field.replace("__", ".")
    assert list(changes) == [path]
    (record,) = config_history.read_history(tmp_path)
    assert record["resumed_at_step"] == 7 and record["accepted"] == []
    assert record["changes"][path][1] == value


def test_accepted_changes_are_recorded_in_order(tmp_path):
    config_history.check_resume(
        tmp_path, SAVED, changed(batch_size=512), step=20, accept=True, is_main=True
    )
    config_history.check_resume(
        tmp_path, changed(batch_size=512), changed(batch_size=512, seed=1), step=40,
        accept=True, is_main=True,
    )  # fmt: skip
    history = config_history.read_history(tmp_path)
    assert [h["accepted"] for h in history] == [["batch_size"], ["seed"]]
    assert history[0]["changes"] == {"batch_size": [256, 512]}
    assert [h["resumed_at_step"] for h in history] == [20, 40]


def test_nothing_saved_or_nothing_changed_writes_nothing(tmp_path):
    assert config_history.check_resume(tmp_path, None, SAVED, step=0, is_main=True) == {}
    assert config_history.check_resume(tmp_path, SAVED, SAVED, step=5, is_main=True) == {}
    assert config_history.read_history(tmp_path) == []


def test_only_the_main_process_writes(tmp_path):
    new = changed(log_every_steps=1)
    assert config_history.check_resume(tmp_path, SAVED, new, step=3, is_main=False)
    assert config_history.read_history(tmp_path) == []
