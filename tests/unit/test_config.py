"""The typed config: recipes load, overrides coerce, and every user mistake names its dotted key."""

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

import pytest

from luffy_megatron.config import (
    Config,
    ConfigError,
    config_paths,
    dump_yaml,
    load_config,
    parse_overrides_from_argv,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SNAPSHOT = Path(__file__).with_name("config_paths.snapshot")


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# ----- loading -------------------------------------------------------------------------------------------------


def test_defaults_are_the_paper_main_run():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.rollout.n, cfg.rollout.n_off_policy) == (8, 1)
    assert cfg.algo.off_policy_reshape == "p_div_p_0.1"
    assert cfg.algo.loss_agg_mode == "constant_length"
    assert cfg.parallel.world_size == 8 and cfg.parallel.data_parallel_size == 8


def test_shipped_recipes_are_the_two_expected():
    assert {p.name for p in RECIPES} >= {"luffy_main.yaml", "cpu_demo.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_validates_and_round_trips(recipe, tmp_path):
    cfg = load_config(str(recipe))
    validate(cfg)
    dumped = tmp_path / "dumped.yaml"
    dump_yaml(cfg, dumped)
    assert load_config(str(dumped)) == cfg
    assert load_config(str(dumped)).to_dict() == cfg.to_dict()


def test_main_recipe_matches_train_sh():
    cfg = load_config(str(REPO / "recipes/luffy_main.yaml"))
    assert cfg.model.path == "models/Qwen2.5-Math-7B-16k-think"
    assert cfg.data.train_files == ["data/openr1.parquet"] and cfg.data.val_files == ["data/valid.parquet"]
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length, cfg.data.train_batch_size) == (1024, 8192, 128)
    assert (cfg.actor.lr, cfg.actor.ppo_mini_batch_size, cfg.actor.ppo_max_token_len_per_gpu) == (1e-6, 64, 32768)
    assert (cfg.rollout.tensor_model_parallel_size, cfg.rollout.val_temperature) == (2, 0.6)
    assert (cfg.trainer.save_freq, cfg.trainer.test_freq, cfg.trainer.total_epochs) == (50, 10, 30)
    # upstream ran 1 node x 8 GPUs (DP=8); the recipe runs on 8 nodes at DP=32 (tools/plan.py: it fits) with
    # upstream's gradient scale (the loss x 32 / 8) and upstream's lr 0 on the first trainer step
    assert (cfg.parallel.nnodes, cfg.parallel.n_gpus_per_node) == (8, 8)
    assert cfg.parallel.data_parallel_size == 32
    assert (cfg.algo.dp_gradient_reduction, cfg.algo.reference_dp) == ("mean", 8)
    assert cfg.actor.zero_lr_first_step is True


def test_cpu_demo_recipe_is_small_and_on_cpu():
    cfg = load_config(str(REPO / "recipes/cpu_demo.yaml"))
    assert cfg.trainer.device == "cpu" and cfg.model.dtype == "fp32"
    assert cfg.parallel.world_size == 1 and cfg.rollout.tensor_model_parallel_size == 1
    assert (cfg.rollout.n, cfg.data.train_batch_size, cfg.actor.ppo_mini_batch_size) == (4, 4, 2)
    assert cfg.trainer.total_training_steps == 12 and cfg.actor.lr == 3e-5


def test_empty_recipe_and_empty_section_mean_defaults(tmp_path):
    assert load_config(str(_recipe(tmp_path, "# nothing\n"))) == Config()
    assert load_config(str(_recipe(tmp_path, "algo:\n"))) == Config()


# ----- overrides -----------------------------------------------------------------------------------------------


def test_overrides_set_nested_values_with_types():
    cfg = load_config(
        None,
        [
            "algo.off_policy_reshape=p_div_p_0.5",
            "algo.sft_loss_coef=2",  # int accepted for float
            "actor.lr=1e-5",  # YAML 1.1 would read this as a string
            "data.train_files=[a.parquet, b.parquet]",
            "rollout.n=16",
            "rollout.enforce_eager=false",
            "model.fp8=e4m3",
        ],
    )
    assert cfg.algo.off_policy_reshape == "p_div_p_0.5"
    assert cfg.algo.sft_loss_coef == 2.0 and isinstance(cfg.algo.sft_loss_coef, float)
    assert cfg.actor.lr == 1e-5
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.rollout.n == 16 and cfg.rollout.enforce_eager is False
    assert cfg.model.fp8 == "e4m3"


def test_override_null_for_optional_and_last_one_wins():
    cfg = load_config(None, ["model.fp8=e4m3", "model.fp8=null", "rollout.num_engines=2", "rollout.num_engines=~"])
    assert cfg.model.fp8 is None and cfg.rollout.num_engines is None


def test_override_beats_recipe(tmp_path):
    path = _recipe(tmp_path, "rollout:\n  n: 4\n  temperature: 0.7\n")
    cfg = load_config(str(path), ["rollout.n=6"])
    assert (cfg.rollout.n, cfg.rollout.temperature) == (6, 0.7)


def test_override_numbers_for_string_fields_stay_strings():
    cfg = load_config(None, ["logging.experiment_name=2024", "model.path="])
    assert cfg.logging.experiment_name == "2024" and cfg.model.path == ""


def test_parse_argv():
    argv = ["--config", "recipes/cpu_demo.yaml", "--set", "rollout.n=4", "--set=algo.clip_ratio=0.3"]
    assert parse_overrides_from_argv(argv) == ("recipes/cpu_demo.yaml", ["rollout.n=4", "algo.clip_ratio=0.3"])
    assert parse_overrides_from_argv(["--config=x.yaml"]) == ("x.yaml", [])
    assert parse_overrides_from_argv([]) == (None, [])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["rollout.n=4"], "--set rollout.n=4"),
        (["--bogus"], "--bogus"),
        (["--set"], "--set needs a value"),
        (["--config", "a.yaml", "--config", "b.yaml"], "--config given twice"),
    ],
)
def test_parse_argv_errors(argv, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_overrides_from_argv(argv)


# ----- errors that name the key --------------------------------------------------------------------------------


def test_unknown_key_lists_the_section_and_suggests():
    message = _error(["algo.clip_ration=0.3"])
    assert "algo.clip_ration" in message and "clip_ratio" in message and "Did you mean 'algo.clip_ratio'" in message
    assert "loss_agg_mode" in message  # lists the section's valid keys


def test_key_in_the_wrong_section_points_to_the_right_one():
    assert "Did you mean 'actor.lr'" in _error(["algo.lr=1e-6"])


def test_unknown_section(tmp_path):
    message = _error(path=str(_recipe(tmp_path, "optim:\n  lr: 1.0e-6\n")))
    assert "recipe.yaml" in message and "'optim'" in message and "rollout" in message


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("trainer.seed=abc", "trainer.seed", "expects an int, got string 'abc'"),
        ("rollout.n=2.5", "rollout.n", "expects an int, got float 2.5"),
        ("trainer.val_before_train=1", "trainer.val_before_train", "expects a bool (true or false), got int 1"),
        ("algo.clip_ratio=true", "algo.clip_ratio", "expects a float, got bool True"),
        ("data.train_files=a.parquet", "data.train_files", "expects a list of strings"),
        ("data.train_files=[a.parquet, 3]", "data.train_files[1]", "expects a string"),
        ("model.path=null", "model.path", "expects a string, got null"),
    ],
)
def test_wrong_type(override, key, expected):
    message = _error([override])
    assert key in message and expected in message


def _float_settings() -> list[str]:
    """The dotted paths of every float setting (Optional[float] included)."""
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif tp is float or (
                typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)
            ):
                out.append(prefix + f.name)

    walk(Config, "")
    return out


def test_every_float_setting_refuses_nan_and_infinities(tmp_path):
    """YAML reads .nan and .inf as floats; no setting means them (actor.lr=.nan would train on NaN)."""
    floats = _float_settings()
    assert {"actor.lr", "rollout.temperature", "reward.timeout_s"} <= set(floats) and len(floats) > 20
    for key in floats:
        for value in (".nan", ".inf", "-.inf"):
            message = _error([f"{key}={value}"])
            assert message.startswith(f"--set {key}=") and "is not a finite number" in message, (key, value, message)
    message = _error(path=str(_recipe(tmp_path, "actor:\n  lr: .nan\n")))
    assert message == f"{tmp_path / 'recipe.yaml'}: actor.lr=nan is not a finite number; give a finite value"
    assert load_config(None, ["actor.lr=1e-6"]).actor.lr == 1e-6  # finite values still load


def test_wrong_type_in_recipe_names_the_file(tmp_path):
    message = _error(path=str(_recipe(tmp_path, "rollout:\n  n: eight\n")))
    assert "recipe.yaml: rollout.n expects an int" in message


def test_bad_literal_lists_the_choices(tmp_path):
    message = _error(path=str(_recipe(tmp_path, "algo:\n  off_policy_reshape: p_div_p_0.2\n")))
    assert message == (
        f"{tmp_path / 'recipe.yaml'}: algo.off_policy_reshape='p_div_p_0.2' is not one of: "
        "no_reshape, logp, p_logp, square_root, p_div_p_0.1, p_div_p_0.3, p_div_p_0.5, pow"
    )
    assert "e4m3, hybrid, null" in _error(["model.fp8=e5m2"])


def test_upstream_loss_remove_token_mean_says_what_to_use():
    message = _error(["algo.loss_remove_token_mean=true"])
    assert "algo.loss_remove_token_mean" in message
    assert "algo.loss_agg_mode=constant_length" in message and "token_mean" in message


def test_section_given_a_scalar_and_setting_used_as_section():
    assert "algo is a section" in _error(["algo=3"])
    assert "algo.clip_ratio is a setting, not a section" in _error(["algo.clip_ratio.x=1"])
    assert "section.key=value" in _error(["rollout.n"])


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["rollout.n_off_policy=9"], ["rollout.n_off_policy", "rollout.n"]),
        (["rollout.n_off_policy=-2"], ["rollout.n_off_policy"]),
        (["rollout.n=0"], ["rollout.n"]),
        (["rollout.min_prefix_ratio=0.8", "rollout.max_prefix_ratio=0.5"], ["rollout.min_prefix_ratio"]),
        (["rollout.max_prefix_ratio=1.5"], ["rollout.max_prefix_ratio"]),
        (["parallel.tensor_model_parallel_size=3"], ["parallel.tensor_model_parallel_size", "parallel.nnodes"]),
        (["parallel.context_parallel_size=0"], ["parallel.context_parallel_size"]),
        (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "parallel.tensor_model_parallel_size"]),
        (["parallel.virtual_pipeline_model_parallel_size=2"], ["parallel.virtual_pipeline_model_parallel_size"]),
        (["rollout.prefix_strategy=linear"], ["rollout.prefix_strategy", "rollout.prefix_share_across_samples"]),
        (
            ["rollout.prefix_strategy=fixed", "rollout.min_prefix_ratio=0.0"],
            ["rollout.prefix_strategy", "rollout.n_off_policy"],
        ),
        (
            ["rollout.prefix_strategy=fixed", "rollout.prefix_share_across_samples=true"],
            ["rollout.prefix_share_across_samples"],
        ),
        (["algo.use_sft_multitask_loss=true"], ["algo.use_off_policy_loss", "algo.use_sft_multitask_loss"]),
        (
            ["algo.use_sft_multitask_loss=true", "algo.use_off_policy_loss=false"],
            ["algo.use_sft_multitask_loss", "algo.adv_estimator"],
        ),
        (["algo.use_kl_loss=true"], ["algo.use_kl_loss", "algo.kl_loss_coef"]),
        (["algo.clip_ratio=1.0"], ["algo.clip_ratio"]),
        (["algo.reference_dp=0"], ["algo.reference_dp"]),
        (
            ["algo.reference_dp=8", "algo.dp_gradient_reduction=sum"],
            ["algo.reference_dp", "algo.dp_gradient_reduction"],
        ),
        (["data.train_batch_size=100"], ["data.train_batch_size", "actor.ppo_mini_batch_size"]),
        (["data.max_response_length=0"], ["data.max_response_length"]),
        (["actor.ppo_max_token_len_per_gpu=4096"], ["actor.ppo_max_token_len_per_gpu"]),
        (["model.fp8=e4m3", "model.transformer_impl=local"], ["model.fp8", "model.transformer_impl"]),
        (["model.fp8=hybrid", "model.dtype=fp32"], ["model.fp8", "model.dtype"]),
        (["reward.timeout_s=0"], ["reward.timeout_s"]),
        (["reward.num_workers=0"], ["reward.num_workers"]),
        (["trainer.save_freq=0"], ["trainer.save_freq"]),
    ],
)
def test_impossible_combinations(overrides, keys):
    message = _error(overrides)
    for key in keys:
        assert key.split(".")[-1] in message and key.split(".")[0] in message, (key, message)
    assert keys[0] in message, message


def test_allowed_edge_cases():
    load_config(None, ["rollout.n_off_policy=0"])  # pure on-policy
    load_config(None, ["rollout.n_off_policy=-1"])  # every row prefixed
    load_config(None, ["rollout.max_prefix_len=16384"])  # longer than the response: truncated, as upstream
    load_config(None, ["rollout.prefix_strategy=fixed"])  # one slot is fine when min == max
    load_config(None, ["rollout.prefix_strategy=fixed", "rollout.n_off_policy=4", "rollout.min_prefix_ratio=0"])
    load_config(None, ["rollout.prefix_strategy=linear", "rollout.prefix_share_across_samples=true"])
    load_config(None, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"])
    load_config(None, ["algo.reference_dp=1"])  # upstream on one GPU
    load_config(None, ["algo.reference_dp=null", "algo.dp_gradient_reduction=sum"])
    load_config(
        None,
        ["algo.use_off_policy_loss=false", "algo.use_sft_multitask_loss=true", "algo.adv_estimator=grpo_split"],
    )


def test_several_problems_are_reported_together():
    message = _error(["rollout.n_val=0", "reward.num_workers=0"])
    assert "2 problems" in message and "rollout.n_val" in message and "reward.num_workers" in message


# ----- bad recipe files ----------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = _recipe(tmp_path, "rollout:\n  n: [8\n")
    message = _error(path=str(path))
    assert str(path) in message and "not valid YAML" in message


def test_duplicate_key_is_an_error(tmp_path):
    message = _error(path=str(_recipe(tmp_path, "rollout:\n  n: 8\n  n: 4\n")))
    assert "duplicate key 'n'" in message


def test_non_mapping_recipe(tmp_path):
    message = _error(path=str(_recipe(tmp_path, "- rollout\n- algo\n")))
    assert "recipe.yaml" in message and "mapping of sections" in message and "got list" in message


def test_missing_recipe_file(tmp_path):
    assert "recipe file not found" in _error(path=str(tmp_path / "nope.yaml"))


# ----- snapshot of every setting -------------------------------------------------------------------------------


def test_config_paths_snapshot():
    """A new or changed setting must show up as a reviewed diff of tests/unit/config_paths.snapshot."""
    current = "".join(f"{path} = {default}\n" for path, default in config_paths(Config))
    if os.environ.get("LUFFY_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(current)
    committed = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    if current != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                current.splitlines(keepends=True),
                fromfile=str(SNAPSHOT.relative_to(REPO)),
                tofile="config_paths(Config)",
            )
        )
        pytest.fail(
            "The config settings changed. If intended, regenerate the snapshot with\n"
            "  LUFFY_UPDATE_SNAPSHOT=1 pytest tests/unit/test_config.py\n"
            f"and commit it with the change.\n{diff}"
        )


def test_config_paths_cover_every_leaf_and_accept_an_instance():
    paths = dict(config_paths(Config))
    assert paths["algo.off_policy_reshape"] == "'p_div_p_0.1'"
    assert paths["data.train_files"] == "[]"
    assert dict(config_paths(load_config(None, ["rollout.n=4"])))["rollout.n"] == "4"
    assert len(paths) == sum(len(section) for section in Config().to_dict().values())
