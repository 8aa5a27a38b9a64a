"""The SM_* naming and value rules, and hyperparameters as arguments."""
from __future__ import annotations

from pathlib import Path

from smchainer.training.env import TrainingEnv
from smchainer.training.sm_env import env_value, sm_variables, to_cmd_args


def test_values_strings_as_is_none_empty_the_rest_compact_sorted_json() -> None:
    assert env_value("a b") == "a b"
    assert env_value(None) == ""
    assert env_value(True) == "true"
    assert env_value({"b": [1, 2], "a": None}) == '{"a":null,"b":[1,2]}'
    assert env_value(Path("/x")) == "/x"


def test_names_are_upper_cased_with_dashes_kept_and_reserved_keys_hidden() -> None:
    env = TrainingEnv(job_dir=Path("/j"), channels={"train-2": Path("/j/input/data/train-2")},
                      hyperparameters={"batch-size": 4, "note": None,
                                       "sagemaker_program": "t.py"},
                      user_entry_point="t.py")
    variables = sm_variables(env)
    assert variables["SM_HP_BATCH-SIZE"] == "4"
    assert variables["SM_HP_NOTE"] == ""
    assert variables["SM_CHANNEL_TRAIN-2"] == "/j/input/data/train-2"
    assert "SM_HP_SAGEMAKER_PROGRAM" not in variables
    assert variables["SM_FRAMEWORK_PARAMS"] == '{"sagemaker_program":"t.py"}'
    assert variables["SM_USER_ARGS"] == '["--batch-size","4","--note","None"]'


def test_arguments_sorted_one_letter_short_dicts_joined_values_as_sagemaker() -> None:
    assert to_cmd_args({"z": 1, "alpha": True, "opts": {"y": 2, "x": "a"},
                        "sagemaker_region": "x", "list": [1, 2]}) == [
        "--alpha", "True", "--list", "[1, 2]", "--opts", "x=a,y=2", "-z", "1"]
