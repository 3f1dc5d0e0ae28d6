"""Typed configuration: a tree of dataclasses, loaded from a YAML recipe plus dotted overrides.

One spelling per setting: every option is a field in ``sections.py`` or ``algo_section.py``, with its default
next to it, and that is the only place it is declared. A recipe (``recipes/*.yaml``) sets some of the fields;
``--set section.key=value`` on the command line sets more; ``validate`` then rejects combinations that cannot
run: each section's own rules (its ``problems()``), then the rules that join sections (``checks.py``), all
reported at once. Unknown keys, wrong types and values outside a ``Literal`` are errors that name the dotted key,
what was given and what is allowed (``loading.py``), because a silently ignored typo in an RL recipe costs a
whole run.

Names follow upstream LUFFY (``actor_rollout_ref.actor.off_policy_reshape`` -> ``algo.off_policy_reshape``)
so its users find their way; the few renamed ones are listed in ``loading._RENAMED_UPSTREAM_KEYS``.

The list of every dotted path with its default is snapshotted by ``tests/unit/test_config.py``, so adding or
changing a setting shows up as a reviewed diff.

errors.py        ConfigError
sections.py      the section dataclasses and Config, each section with its `problems()`
algo_section.py  the algo section (the largest), with `AlgoConfig.from_upstream` for upstream's flat options
loading.py       load_config, the YAML recipe and --set overrides, type checks; dump_yaml (yaml_text), config_paths
checks.py        validate: the section rules plus the cross-section rules (uses cluster.layout)
"""

from .checks import validate
from .errors import ConfigError
from .loading import config_paths, dump_yaml, load_config, parse_overrides_from_argv, yaml_text
from .sections import (
    ActorConfig,
    AlgoConfig,
    ClusterConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "ActorConfig",
    "AlgoConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
    "config_paths",
    "dump_yaml",
    "load_config",
    "parse_overrides_from_argv",
    "validate",
    "yaml_text",
]
