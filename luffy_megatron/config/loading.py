"""Reading a recipe and `--set` overrides into the config tree, with every value type-checked; writing and
listing a config.

Unknown keys, wrong types and values outside a ``Literal`` are errors that name the dotted key, what was given
and what is allowed, because a silently ignored typo in an RL recipe costs a whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from typing import Any, Literal, Sequence, Union

import yaml

from .checks import validate
from .errors import ConfigError
from .sections import Config

# Upstream keys that exist here under another spelling: a user porting a script gets told the new one.
_RENAMED_UPSTREAM_KEYS = {
    "algo.loss_remove_token_mean": (
        "use algo.loss_agg_mode=constant_length (upstream loss_remove_token_mean=true) "
        "or algo.loss_agg_mode=token_mean (false)"
    ),
    "rollout.n_prefix": "use rollout.n_off_policy (same meaning; 0 = pure on-policy, -1 = every row)",
    "actor.lr_warmup_style": "the schedule is always upstream's constant-with-warmup; remove the key "
    "(actor.lr_warmup_steps_ratio sets the warmup)",
    "data.disable_truncation_advantage": "use algo.disable_truncation_advantage",
    "actor.use_sft_prefix_reward": "use algo.use_sft_prefix_reward (and algo.sft_prefix_reward_weight)",
    "algo.kl_ctrl": (
        "upstream's algorithm.kl_ctrl section is flat here: algo.kl_ctrl_type (type), algo.kl_ctrl_coef (kl_coef), "
        "algo.kl_ctrl_target_kl (target_kl), algo.kl_ctrl_horizon (horizon)"
    ),
}


# --------------------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, where `1e-6` (no dot, or no exponent sign) is a string. Recipes write learning
# rates that way, so both the loader and the dumper resolve such scalars as floats.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """Safe loader that reads `1e-6` as a float and rejects duplicate keys (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Quotes strings that `_Loader` would read back as floats, so dump_yaml round-trips."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the recipe at `path` (None = defaults only), then `overrides` ("a.b=value"), validated."""
    cfg = Config()
    if path is not None:
        _apply_mapping(cfg, _read_recipe(path), prefix="", where=f"{path}: ")
    for text in overrides:
        _apply_override(cfg, text)
    try:
        validate(cfg)
    except ConfigError as err:
        origin = " + ".join(s for s in (str(path) if path else "", "--set overrides" if overrides else "") if s)
        raise ConfigError(f"{origin}: {err}" if origin else str(err)) from None
    return cfg


def parse_overrides_from_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--config PATH` (once), repeated `--set a.b=v` and `--resume CHECKPOINT` (= `--set trainer.resume_from=...`)
    (argv without the program name)."""
    recipe: str | None = None
    overrides: list[str] = []
    usage = "usage: [--config RECIPE.yaml] [--set section.key=value ...] [--resume CHECKPOINT_DIR]"
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if flag in ("--config", "--set", "--resume"):
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"{flag} needs a value; {usage}")
            if flag == "--config":
                if recipe is not None:
                    raise ConfigError(f"--config given twice ({recipe!r} and {value!r}); {usage}")
                recipe = value
            elif flag == "--resume":
                overrides.append(f"trainer.resume_from={value}")
            else:
                overrides.append(value)
        elif "=" in arg and not arg.startswith("-"):
            raise ConfigError(f"unexpected argument {arg!r}; write it as --set {arg}")
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {usage}")
        i += 1
    return recipe, overrides


def _read_recipe(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:  # an empty file is an empty recipe
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe must be a mapping of sections ({', '.join(_field_types(Config))}), "
            f"got {_yaml_type(data)} at the top level"
        )
    return data


def _apply_override(cfg: Config, text: str) -> None:
    """Set one "section.key=value"; the value is a YAML scalar or flow list ([a, b]), `null` for None."""
    where = "--set "
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set expects section.key=value (e.g. algo.clip_ratio=0.2), got {text!r}")
    *sections, name = key.split(".")
    node, prefix = cfg, ""
    for part in sections:
        tp = _lookup(node, prefix, part, where)
        dotted = _join(prefix, part)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}{key}: {dotted} is a setting, not a section; set it as {dotted}=value")
        node, prefix = getattr(node, part), dotted
    tp = _lookup(node, prefix, name, where)
    if raw.strip() == "":
        value: Any = ""
    else:
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}{key}: cannot parse {raw!r} as a YAML value: {err}") from None
    # A shell makes quoting awkward, so `logging.experiment_name=2024` means the string "2024".
    if _accepts_str(tp) and isinstance(value, (bool, int, float)):
        value = raw.strip()
    _set_field(node, prefix, name, value, where)


def _apply_mapping(node: Any, data: Any, prefix: str, where: str) -> None:
    for name, value in data.items():
        _set_field(node, prefix, str(name), value, where)


def _set_field(node: Any, prefix: str, name: str, value: Any, where: str) -> None:
    tp = _lookup(node, prefix, name, where)
    dotted = _join(prefix, name)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out
            return
        if not isinstance(value, dict):
            keys = ", ".join(_field_types(tp))
            raise ConfigError(
                f"{where}{dotted} is a section; give it a mapping of its keys ({keys}), "
                f"got {_yaml_type(value)} {value!r}"
            )
        _apply_mapping(getattr(node, name), value, dotted, where)
    else:
        setattr(node, name, _check_value(value, tp, dotted, where))


def _lookup(node: Any, prefix: str, name: str, where: str) -> Any:
    """The declared type of node.<name>; an unknown name is an error listing the valid ones."""
    types_ = _field_types(type(node))
    if name in types_:
        return types_[name]
    dotted = _join(prefix, name)
    if dotted in _RENAMED_UPSTREAM_KEYS:
        raise ConfigError(f"{where}{dotted} is the upstream LUFFY spelling; {_RENAMED_UPSTREAM_KEYS[dotted]}")
    what = f"section {prefix!r}" if prefix else "the config"
    noun = "keys" if prefix else "sections"
    message = f"{where}unknown key {dotted!r} in {what}; valid {noun}: {', '.join(types_)}"
    close = difflib.get_close_matches(name, list(types_), n=1)
    elsewhere = [p for p, _ in config_paths(Config) if p.rsplit(".", 1)[-1] == name]
    if close:
        message += f". Did you mean {_join(prefix, close[0])!r}?"
    elif elsewhere:
        message += f". Did you mean {' or '.join(map(repr, elsewhere))}?"
    raise ConfigError(message)


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` if it has type `tp` (an int is widened to float); otherwise a ConfigError naming `key`."""
    nullable = _is_optional(tp)
    if nullable:
        if value is None:
            return None
        tp = _strip_none(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(args) + (", null" if nullable else "")
        raise ConfigError(f"{where}{key}={value!r} is not one of: {choices}")
    hint = ""
    if origin is list:
        if isinstance(value, list):
            return [_check_value(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
        hint = f" (write a list, e.g. [{value}])" if isinstance(value, str) else ""
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf: no setting means them
                raise ConfigError(f"{where}{key}={value!r} is not a finite number; give a finite value")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
        if tp is str and isinstance(value, (int, float, bool)):
            hint = f" (quote it to mean the string: '{value}')"
    else:
        raise TypeError(f"config/loading.py cannot check fields of type {tp!r} ({key}); extend _check_value")
    raise ConfigError(f"{where}{key} expects {_type_name(tp, nullable)}, got {_yaml_type(value)} {value!r}{hint}")


# --------------------------------------------------------------------------------------------------------------
# Writing and listing
# --------------------------------------------------------------------------------------------------------------


def yaml_text(cfg: Config) -> str:
    """The full config as the text of a recipe that load_config reads back to an equal Config."""
    text = "# Full configuration written by luffy_megatron.config.dump_yaml; loads with --config.\n"
    return text + yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def dump_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full config as a recipe that load_config reads back to an equal Config (atomically)."""
    text = yaml_text(cfg)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".yaml.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_paths(cfg_or_cls: Any = Config) -> list[tuple[str, str]]:
    """Every dotted setting path with the repr of its value (of the defaults, when given a class)."""
    node = cfg_or_cls() if isinstance(cfg_or_cls, type) else cfg_or_cls
    paths: list[tuple[str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, _join(prefix, f.name))
            else:
                paths.append((_join(prefix, f.name), repr(value)))

    walk(node, "")
    return paths


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------

_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved field types in declaration order (annotations are strings under `from __future__`)."""
    if cls not in _TYPE_CACHE:
        hints = typing.get_type_hints(cls)
        _TYPE_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _TYPE_CACHE[cls]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_none(tp: Any) -> Any:
    (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]  # the tree only uses `X | None`
    return inner


def _accepts_str(tp: Any) -> bool:
    return (_strip_none(tp) if _is_optional(tp) else tp) is str


def _type_name(tp: Any, nullable: bool = False) -> str:
    if typing.get_origin(tp) is list:
        name = f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    else:
        name = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string"}[tp]
    return name + (" or null" if nullable else "")


def _yaml_type(value: Any) -> str:
    """The type as a recipe author sees it."""
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
