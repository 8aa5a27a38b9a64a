"""The SageMaker training contract as environment variables and arguments.

Everything a SageMaker training script may read is computed here from a
:class:`~smchainer.training.env.TrainingEnv`: the ``SM_*`` variables (see
``docs/CONTRACT.md``), ``SM_TRAINING_ENV`` (one JSON object with all of them) and
the hyperparameters as command-line arguments.

Naming rule: ``"SM_" + key.upper()``, dashes kept (``batch-size`` ->
``SM_HP_BATCH-SIZE``). Values: strings as they are; anything else JSON with
sorted keys and no spaces; ``None`` -> empty string.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smchainer.training.config import TRAIN_MODULE
from smchainer.training.env import TrainingEnv

RESERVED_PREFIX = "sagemaker_"
FRAMEWORK_MODULE = f"{TRAIN_MODULE}:main"
INSTANCE_TYPE = "local"
INSTANCE_GROUP = "homogeneousCluster"


def env_value(value: Any) -> str:
    """One value in its ``SM_*`` form: strings as is, None empty, the rest compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def split_hyperparameters(hyperparameters: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(user, reserved)``: the reserved ``sagemaker_*`` keys go to the launcher only."""
    user = {k: v for k, v in hyperparameters.items() if not k.startswith(RESERVED_PREFIX)}
    reserved = {k: v for k, v in hyperparameters.items() if k.startswith(RESERVED_PREFIX)}
    return user, reserved


def to_cmd_args(hyperparameters: Mapping[str, Any]) -> list[str]:
    """Hyperparameters as the script's arguments, as SageMaker builds them.

    Keys sorted; ``--key value`` (one-letter keys ``-k value``); a dict
    becomes ``k1=v1,k2=v2``; every other value is ``str(value)``, so ``True``
    is ``"True"`` exactly as under SageMaker. ``sagemaker_*`` keys are left out.
    """
    user, _ = split_hyperparameters(hyperparameters)
    args: list[str] = []
    for key in sorted(user):
        value = user[key]
        args.append(f"--{key}" if len(key) > 1 else f"-{key}")
        if isinstance(value, Mapping):
            args.append(",".join(f"{k}={v}" for k, v in sorted(value.items())))
        else:
            args.append(str(value))
    return args


def resource_config(env: TrainingEnv) -> dict[str, Any]:
    """The content of ``resourceconfig.json`` for this host."""
    return {
        "current_host": env.current_host,
        "current_instance_type": INSTANCE_TYPE,
        "current_group_name": INSTANCE_GROUP,
        "hosts": list(env.hosts),
        "instance_groups": [{
            "instance_group_name": INSTANCE_GROUP,
            "instance_type": INSTANCE_TYPE,
            "hosts": list(env.hosts),
        }],
        "network_interface_name": env.network_interface_name,
    }


def input_data_config(channels: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The content of ``inputdataconfig.json``: every channel in File mode."""
    return {
        name: {
            "TrainingInputMode": "File",
            "S3DistributionType": "FullyReplicated",
            "RecordWrapperType": "None",
        }
        for name in sorted(channels)
    }


def module_name(entry_point: str | None) -> str | None:
    """``train.py`` -> ``train``; a path keeps only its last part."""
    if not entry_point:
        return None
    name = Path(entry_point).name
    return name[:-3] if name.endswith(".py") else name


def training_env(env: TrainingEnv) -> dict[str, Any]:
    """``SM_TRAINING_ENV``: one object with everything the variables say."""
    user, reserved = split_hyperparameters(env.hyperparameters)
    return {
        "additional_framework_parameters": reserved,
        "channel_input_dirs": {name: str(path) for name, path in sorted(env.channels.items())},
        "checkpoint_dir": str(env.checkpoints),
        "current_host": env.current_host,
        "current_instance_group": INSTANCE_GROUP,
        "current_instance_type": INSTANCE_TYPE,
        "framework_module": FRAMEWORK_MODULE,
        "hosts": list(env.hosts),
        "hyperparameters": user,
        "input_config_dir": str(env.input_config_dir),
        "input_data_config": input_data_config(env.channels),
        "input_dir": str(env.input_dir),
        "instance_groups": [INSTANCE_GROUP],
        "is_hetero": False,
        "is_master": env.is_master,
        "job_name": env.job_name,
        "log_level": env.log_level,
        "master_hostname": env.hosts[0],
        "model_dir": str(env.model_dir),
        "module_dir": str(env.code_dir),
        "module_name": module_name(env.user_entry_point),
        "network_interface_name": env.network_interface_name,
        "num_cpus": env.num_cpus,
        "num_gpus": env.num_gpus,
        "output_data_dir": str(env.output_data_dir),
        "output_dir": str(env.output_dir),
        "output_intermediate_dir": str(env.output_intermediate_dir),
        "resource_config": resource_config(env),
        "user_entry_point": env.user_entry_point,
    }


def sm_variables(env: TrainingEnv) -> dict[str, str]:
    """Every ``SM_*`` variable (plus ``CURRENT_HOST``) for a script of ``env``."""
    user, reserved = split_hyperparameters(env.hyperparameters)
    values: dict[str, Any] = {
        "model_dir": env.model_dir,
        "output_dir": env.output_dir,
        "output_data_dir": env.output_data_dir,
        "output_intermediate_dir": env.output_intermediate_dir,
        "input_dir": env.input_dir,
        "input_config_dir": env.input_config_dir,
        "channels": sorted(env.channels),
        "hps": user,
        "hosts": list(env.hosts),
        "current_host": env.current_host,
        "current_instance_type": INSTANCE_TYPE,
        "current_instance_group": INSTANCE_GROUP,
        "instance_groups": [INSTANCE_GROUP],
        "is_hetero": False,
        "num_gpus": env.num_gpus,
        "num_cpus": env.num_cpus,
        "network_interface_name": env.network_interface_name,
        "user_entry_point": env.user_entry_point,
        "user_args": to_cmd_args(user),
        "module_name": module_name(env.user_entry_point),
        "module_dir": env.code_dir,
        "framework_module": FRAMEWORK_MODULE,
        "log_level": env.log_level,
        "framework_params": reserved,
        "resource_config": resource_config(env),
        "input_data_config": input_data_config(env.channels),
        "training_env": training_env(env),
    }
    for name, path in env.channels.items():
        values[f"channel_{name}"] = path
    for key, value in user.items():
        values[f"hp_{key}"] = value
    variables = {"SM_" + key.upper(): env_value(value) for key, value in values.items()}
    variables["CURRENT_HOST"] = env.current_host
    return variables
