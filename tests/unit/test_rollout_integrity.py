"""Rollout integrity and fault reporting without Ray or vLLM: where the engines' log-probs go in the batch,
the drift, the staleness guard, rollout.max_logprob_diff, the settings' validation, and how luffy-train reports
data, model-loading and run errors (one `luffy-train: error:` line). The same paths on real engines and a
real rank: tests/e2e/test_fault_matrix.py."""

from __future__ import annotations

import logging

import pytest
import torch

from luffy_megatron.algo.composition import assemble_responses
from luffy_megatron.rollout.engine import Generation, _sampled_logprobs, _span_versions
from luffy_megatron.rollout.integrity import (
    LogprobDriftError,
    StaleRolloutError,
    check_weight_versions,
    drift_metrics,
    enforce_max_logprob_diff,
    logprob_drift,
    record_generations,
)
from tests.helpers import REPO

EOS, PAD = 2, 0


def _batch(prefixes, generations, width=6):
    responses, prefix_mask, response_mask = assemble_responses(
        prefixes=prefixes,
        generations=[g.token_ids if g else [] for g in generations],
        eos_token_id=EOS,
        pad_token_id=PAD,
        response_length=width,
    )
    return (
        responses,
        prefix_mask,
        response_mask,
        record_generations(prefixes=prefixes, generations=generations, response_mask_BT=response_mask),
    )


def test_engine_log_probs_sit_on_the_generated_tokens_only():
    prefixes = [[], [5, 6], [7, 8, EOS], [9]]
    generations = [
        Generation([11, 12, EOS, 13], [-0.1, -0.2, -0.3, -0.4], (3,), engine=0),  # tokens after EOS: masked
        Generation([14, 15, 16, 17, 18], [-1.0, -1.1, -1.2, -1.3, -1.4], (3,), engine=1),  # cut at width 6
        None,  # a full demonstration: no engine
        Generation([], [], (3,), engine=1),
    ]
    responses, prefix_mask, response_mask, record = _batch(prefixes, generations)
    assert record.engines == [0, 1, None, 1] and record.weight_versions == [(3,), (3,), (), ()]
    expected_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0] * 6, [0] * 6], dtype=torch.bool)
    assert torch.equal(record.generated_mask_BT, expected_mask)
    assert not (record.generated_mask_BT & prefix_mask).any()  # demonstration tokens come from no engine
    assert torch.equal(responses[record.generated_mask_BT], torch.tensor([11, 12, EOS, 14, 15, 16, 17]))
    assert torch.allclose(record.engine_log_prob_BT[1], torch.tensor([0, 0, -1.0, -1.1, -1.2, -1.3]))
    assert record.num_generated_tokens == 7


def test_drift_is_measured_over_generated_tokens_and_ignores_demonstrations():
    prefixes = [[5, 6], []]
    generations = [
        Generation([11, 12], [-0.5, -0.25], (0,), engine=0),
        Generation([13, 14, 15], [-1.0, -2.0, -3.0], (0,), engine=1),
    ]
    _, _, _, record = _batch(prefixes, generations)
    old = torch.zeros(2, 6)
    old[0, :2] = -9.0  # the demonstration tokens: the actor's numbers there must not count
    old[0, 2:4] = torch.tensor([-0.5, -0.75])
    old[1, :3] = torch.tensor([-1.0, -2.0, -2.0])
    drift = logprob_drift(record, old)
    assert drift["tokens"] == 5 and drift["max"] == pytest.approx(1.0)
    assert drift["mean"] == pytest.approx((0 + 0.5 + 0 + 0 + 1.0) / 5)
    assert logprob_drift(record, old, rows=[0])["mean"] == pytest.approx(0.25)
    metrics = drift_metrics(record, drift)
    assert metrics == {
        "rollout/logprob_diff_mean": drift["mean"],
        "rollout/logprob_diff_max": drift["max"],
        "rollout/weight_version": 0.0,
    }
    assert (
        logprob_drift(
            record_generations(prefixes=[[1]], generations=[None], response_mask_BT=torch.ones(1, 6)), old[:1]
        )
        == {}
    )


def test_the_staleness_guard_names_the_engine_and_both_versions():
    prefixes = [[], [], []]
    generations = [
        Generation([11], [-0.5], (4,), engine=0),
        Generation([12], [-0.5], (3,), engine=1),
        Generation([13], [-0.5], (3,), engine=1),
    ]
    _, _, _, record = _batch(prefixes, generations)
    check_weight_versions(
        record.__class__(
            record.engines[:1], record.weight_versions[:1], record.engine_log_prob_BT[:1], record.generated_mask_BT[:1]
        ),
        4,
    )  # engine 0 is current: passes
    old = torch.full((3, 6), -0.5)
    old[1:, 0] = -2.5
    with pytest.raises(StaleRolloutError) as stale:
        check_weight_versions(record, 4, old_log_prob_BT=old, describe_engine=lambda e: f"engine {e} of 2 (node n{e})")
    err = stale.value
    assert (err.engine, err.engine_version, err.actor_version) == (1, 3, 4)
    assert err.drift == {"mean": 2.0, "max": 2.0, "tokens": 2}  # measured on the stale rows only
    text = str(err)
    assert "engine 1 of 2 (node n1) generated 2 row(s) with weight version 3" in text
    assert "the actor is at weight version 4 (the weights after step 4)" in text and "refused" in text


def test_a_row_sampled_across_a_weight_change_is_stale():
    _, _, _, record = _batch([[]], [Generation([11, 12], [-0.5, -0.5], (2, 3), engine=0)])
    with pytest.raises(StaleRolloutError, match="partly by weights version 2, 3"):
        check_weight_versions(record, 3)


def test_max_logprob_diff_warns_or_fails(caplog):
    drift = {"mean": 0.2, "max": 1.5, "tokens": 40}
    enforce_max_logprob_diff(drift, max_logprob_diff=None, action="error", step=3)  # no limit: nothing
    enforce_max_logprob_diff(drift, max_logprob_diff=0.5, action="error", step=3)  # under the limit
    with caplog.at_level(logging.WARNING, logger="luffy.trainer"):
        enforce_max_logprob_diff(drift, max_logprob_diff=0.1, action="warn", step=3)
    assert "above rollout.max_logprob_diff=0.1" in caplog.text and "training goes on" in caplog.text
    with pytest.raises(
        LogprobDriftError, match=r"step 3: mean .* is 0.2 \(max 1.5\), above rollout.max_logprob_diff=0.1"
    ):
        enforce_max_logprob_diff(drift, max_logprob_diff=0.1, action="error", step=3)


def test_sampled_token_log_probs_and_weight_versions_from_vllm_outputs():
    from types import SimpleNamespace

    from vllm.logprobs import FlatLogprobs, Logprob

    flat = FlatLogprobs()
    flat.append({7: Logprob(-0.5)})
    flat.append({3: Logprob(-1.5), 9: Logprob(-0.1)})  # a top-1 token besides the sampled one
    assert _sampled_logprobs([7, 9], flat) == [-0.5, -0.1]
    assert _sampled_logprobs([7, 9], [{7: Logprob(-0.5)}, {9: Logprob(-0.1), 3: Logprob(-1.5)}]) == [-0.5, -0.1]
    with pytest.raises(RuntimeError, match="no logprob for the sampled token 4"):
        _sampled_logprobs([7, 4], flat)
    with pytest.raises(RuntimeError, match="no logprobs although they were requested"):
        _sampled_logprobs([7], None)
    spans = [
        SimpleNamespace(version="2", start=0, end=3),
        SimpleNamespace(version="2", start=3, end=4),
        SimpleNamespace(version="3", start=4, end=6),
    ]
    assert _span_versions(SimpleNamespace(weight_versions=spans), default=9) == (2, 3)
    assert _span_versions(SimpleNamespace(weight_versions=None), default=9) == (9,)


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.max_logprob_diff=0", "rollout.max_logprob_diff=0.0 must be > 0"),
        ("rollout.max_logprob_diff=-1", "rollout.max_logprob_diff=-1.0 must be > 0"),
        ("rollout.logprob_diff_action=error", "rollout.logprob_diff_action=error has no limit to act on"),
        ("rollout.request_timeout_s=0", "rollout.request_timeout_s=0.0 must be > 0"),
        ("rollout.on_engine_failure=retry", "rollout.on_engine_failure='retry' is not one of: fail, restart"),
        ("rollout.logprob_diff_action=raise", "rollout.logprob_diff_action='raise' is not one of: warn, error"),
    ],
)
def test_integrity_and_fault_settings_are_validated(override, expected):
    from luffy_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError) as bad:
        load_config(None, [override])
    assert expected in str(bad.value)


def test_integrity_and_fault_settings_that_work():
    from luffy_megatron.config import load_config

    cfg = load_config(
        None,
        [
            "rollout.max_logprob_diff=0.05",
            "rollout.logprob_diff_action=error",
            "rollout.request_timeout_s=30",
            "rollout.on_engine_failure=restart",
        ],
    )
    assert (cfg.rollout.max_logprob_diff, cfg.rollout.on_engine_failure) == (0.05, "restart")


# ----------------------------------------------------------------------------------------- what the user sees


def _tiny_args(tmp_path, train_file):
    from tests.e2e.tiny_run import tiny_llama_dir

    return [
        "--config",
        str(REPO / "recipes" / "slurm_cpu_test.yaml"),
        "--set",
        f"model.path={tiny_llama_dir()}",
        "--set",
        f"data.train_files=[{train_file}]",
        "--set",
        "parallel.nnodes=1",
        "--set",
        f"trainer.output_dir={tmp_path / 'out'}",
    ]


def test_a_data_error_is_one_line_not_a_traceback(tmp_path, capsys):
    from luffy_megatron.train.loop import main

    broken = tmp_path / "train.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    assert main(_tiny_args(tmp_path, broken)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"luffy-train: error: {broken}: cannot read as parquet") and "Traceback" not in err
    assert main(_tiny_args(tmp_path, tmp_path / "missing.parquet")) == 2
    assert capsys.readouterr().err.strip() == f"luffy-train: error: {tmp_path / 'missing.parquet'}: file not found"


def test_a_model_the_ranks_cannot_convert_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import ray

    from luffy_megatron.config import load_config
    from luffy_megatron.train import loop, setup

    class Ranks:
        def build(
            self, cfg, hf_dir, pad_token_id, fresh=False
        ):  # what ActorGroup.build raises when a rank's conversion fails
            raise ray.exceptions.RayTaskError(
                "build",
                'Traceback (most recent call last):\n  File "hf_to_mcore.py"\n'
                "ValueError: llama: hidden_act='gelu' is not supported",
                ValueError("llama: hidden_act='gelu' is not supported (only SwiGLU with 'silu')"),
            )

    cfg = load_config(None, [f"model.path={tmp_path / 'model'}"])
    with pytest.raises(setup.ModelLoadError) as bad:
        setup.build_ranks(Ranks(), cfg, 0, tmp_path / "logs")
    assert str(bad.value).startswith(
        f"the Megatron ranks could not load the model (model.path={tmp_path / 'model'}): "
        "ValueError: llama: hidden_act='gelu' is not supported"
    )
    assert "hf_to_mcore.py" in (tmp_path / "logs" / "model_load_error.log").read_text()

    def failing_train(cfg):
        raise bad.value

    monkeypatch.setattr(loop, "train", failing_train)
    assert loop.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("luffy-train: error: the Megatron ranks could not load the model") and "Traceback" not in err


def test_run_errors_are_one_line_with_exit_code_1(monkeypatch, capsys):
    from luffy_megatron.cluster.supervision import RankFailure
    from luffy_megatron.train import loop

    def failing_train(cfg):
        raise RankFailure("Megatron rank 1 of 2 (node 10.0.0.2) died during update: ...", rank=1, what="update")

    monkeypatch.setattr(loop, "train", failing_train)
    assert loop.main([]) == 1
    assert (
        capsys.readouterr().err == "luffy-train: error: Megatron rank 1 of 2 (node 10.0.0.2) died during update: ...\n"
    )


# ----------------------------------------------------------------------------------------- resume draws the same


def test_a_resumed_sampler_and_prefix_draws_are_the_uninterrupted_ones():
    """What a run resumed after step k draws at step k+1 (prompts: PromptSampler at the saved data position;
    prefix ratios: step_rng) is what the run that never stopped draws, across an epoch boundary too."""
    from luffy_megatron.config import load_config
    from luffy_megatron.data.sampler import PromptSampler
    from luffy_megatron.train.step_parts import step_rng

    cfg = load_config(None, [])
    uninterrupted = PromptSampler(10, 4, seed=5)
    batches = [uninterrupted.next_batch() for _ in range(5)]  # 2 batches per epoch (the partial one dropped)
    draws = [step_rng(cfg, s).random() for s in range(1, 6)]
    for k in range(5):
        resumed = PromptSampler(10, 4, seed=5, position=4 * k)
        assert [resumed.next_batch() for _ in range(5 - k)] == batches[k:]
        assert [step_rng(cfg, s).random() for s in range(k + 1, 6)] == draws[k:]
    assert batches[0] != batches[2]  # a new epoch is shuffled anew
