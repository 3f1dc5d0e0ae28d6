"""algo.use_off_policy_probs end to end, short of the Megatron model: the teacher-probability column is read
and validated, aligned with the tokenized demonstration, placed on the demonstration tokens of the rollout
batch, and handed to the loss as the actor does -- where it reproduces upstream's `<case>/target_probs`
reference vectors (the real actor: tests/dist/test_actor.py::test_off_policy_probs_reach_the_actor_loss)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.algo import (
    advantage_options,
    compute_advantages,
    loss_options,
    microbatch_policy_loss,
    prefix_target_probs,
    uses_target_probs,
)
from luffy_megatron.config import ConfigError, load_config
from luffy_megatron.data import DataError, load_tokenized_dataset, read_luffy_parquet
from luffy_megatron.data.prompts import make_prompt
from luffy_megatron.rollout.engine import Generation
from tests.helpers import SHARED
from tools.check_reference_vectors import compare

KEY = "target_ds_qwen_7b_probs"
VECTORS = SHARED / "reference" / "luffy_test_vectors.json"


def demo_text(i: int) -> str:
    return f"<think>\n{i} + {i} = {2 * i}.\n</think>\nThe answer is $\\boxed{{{2 * i}}}$."


def row(i: int, probs=None, **override) -> dict:
    r = {
        "data_source": "",
        "prompt": make_prompt(f"What is {i} + {i}?"),
        "target": [{"role": "assistant", "content": demo_text(i)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        "extra_info": {"split": "train", "index": i},
    }
    if probs is not None:
        r[KEY] = probs
    r.update(override)
    return r


def write(path: Path, rows: list[dict], schema=None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def teacher_probs(n: int, seed: int) -> list[float]:
    """n values in (0, 1], distinct per position (a misalignment by one token shows)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).clamp(min=0.01).tolist()


def num_target_tokens(tokenizer, i: int) -> int:
    """Upstream's target length: the target without its leading <think>\\n, tokenized alone."""
    return len(tokenizer(demo_text(i)[len("<think>\n") :], add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------ reader


def test_reader_reads_the_column_as_float32_arrays_only_when_asked(tmp_path):
    path = write(tmp_path / "train.parquet", [row(0, [0.5, 0.25, 1.0]), row(1, [0.0, 0.75])])
    examples, _ = read_luffy_parquet(path, require_target=True, target_probs_key=KEY)
    assert [ex.target_probs.dtype for ex in examples] == [np.float32, np.float32]
    assert examples[0].target_probs.tolist() == [0.5, 0.25, 1.0] and examples[1].target_probs.tolist() == [0.0, 0.75]
    plain, _ = read_luffy_parquet(path, require_target=True)  # no key: the column is not read at all
    assert [ex.target_probs for ex in plain] == [None, None]
    assert [ex.demo for ex in plain] == [ex.demo for ex in examples]


def test_missing_column_under_the_option_names_file_column_and_setting(tmp_path):
    path = write(tmp_path / "train.parquet", [row(0), row(1)])
    with pytest.raises(DataError) as err:
        read_luffy_parquet(path, require_target=True, target_probs_key=KEY, require_target_probs=True)
    message = str(err.value)
    assert str(path) in message and f"'{KEY}'" in message and "data.target_probs_key" in message
    assert "algo.use_off_policy_probs=true" in message and "algo.use_off_policy_probs=false" in message
    examples, _ = read_luffy_parquet(path, require_target=True, target_probs_key=KEY)  # not required: fine
    assert examples[0].target_probs is None


@pytest.mark.parametrize(
    "bad, problem",
    [
        ([0.5, 1.5, 0.2], r"1 of 3 values are not probabilities in \[0, 1\] \(first: position 1: 1.5\)"),
        ([0.5, 0.2, -1.0, -1.0], r"2 of 4 values .* position 2: -1.0\).*-1 is upstream's in-memory padding"),
        ([0.5, None, 0.2], r"1 of 3 values .*position 1: null or NaN"),
        ([0.5, float("nan")], r"1 of 2 values .*position 1: null or NaN"),
        ([], r"empty list"),
    ],
)
def test_bad_values_name_file_row_and_column(tmp_path, bad, problem):
    path = write(tmp_path / "train.parquet", [row(0, [0.5, 0.5]), row(1, bad), row(2, [0.1])])
    with pytest.raises(DataError, match=rf"{path}: row 1: field '{KEY}': {problem}"):
        read_luffy_parquet(path, require_target=True, target_probs_key=KEY)
    examples, report = read_luffy_parquet(path, require_target=True, target_probs_key=KEY, skip_bad_rows=True)
    assert [ex.row_index for ex in examples] == [0, 2] and report.num_bad_rows == 1  # counted, not silent


def test_null_row_and_wrong_column_type(tmp_path):
    path = write(tmp_path / "train.parquet", [row(0, [0.5]), row(1, None, **{KEY: None})])
    with pytest.raises(DataError, match=rf"row 1: field '{KEY}': missing \(algo.use_off_policy_probs=true"):
        read_luffy_parquet(path, require_target=True, target_probs_key=KEY, require_target_probs=True)
    path = write(tmp_path / "strings.parquet", [row(0, None, **{KEY: "0.5 0.5"})])
    with pytest.raises(DataError, match=rf"{path}: column '{KEY}' has type string; expected a list of floats"):
        read_luffy_parquet(path, require_target=True, target_probs_key=KEY)


# ------------------------------------------------------------------------------------------ tokenization


def test_tokenized_probs_are_aligned_with_demo_ids_plus_eos(qwen_tokenizer, tmp_path):
    counts = [num_target_tokens(qwen_tokenizer, i) for i in range(3)]
    stored = [teacher_probs(n + 1, seed=i) for i, n in enumerate(counts)]
    path = write(tmp_path / "train.parquet", [row(i, stored[i]) for i in range(3)])
    dataset = load_tokenized_dataset(
        path, qwen_tokenizer, require_target=True, target_probs_key=KEY, require_target_probs=True
    )
    for ex, probs in zip(dataset, stored):
        # upstream: one probability per target token (leading <think>\n stripped), then one for the EOS
        assert len(ex.demo_ids) == ex.num_demo_tokens and len(ex.demo_probs) == len(ex.demo_ids) + 1
        assert np.array_equal(ex.demo_probs, np.asarray(probs, dtype=np.float32))
    # truncation to max_prefix_len: the kept tokens keep theirs; the EOS appended after the cut gets 1.0
    cut = load_tokenized_dataset(path, qwen_tokenizer, require_target=True, target_probs_key=KEY, max_prefix_len=5)
    ex = cut[1]
    assert ex.demo_truncated and len(ex.demo_ids) == 5
    assert np.array_equal(ex.demo_probs, np.asarray(stored[1][:5] + [1.0], dtype=np.float32))


def test_probs_length_that_does_not_fit_the_tokenized_target_names_the_row(qwen_tokenizer, tmp_path):
    n1 = num_target_tokens(qwen_tokenizer, 1)
    rows = [
        row(0, teacher_probs(num_target_tokens(qwen_tokenizer, 0) + 1, 0)),
        row(1, teacher_probs(n1, 1)),
    ]  # no EOS prob
    path = write(tmp_path / "train.parquet", rows)
    with pytest.raises(DataError) as err:
        load_tokenized_dataset(path, qwen_tokenizer, require_target=True, target_probs_key=KEY)
    message = str(err.value)
    assert message.startswith(f"{path}: row 1: field '{KEY}': {n1} teacher probabilities")
    assert f"tokenizes to {n1} tokens" in message and f"so {n1 + 1} are expected" in message


# --------------------------------------------------------------------------------- rollout composition


def test_prefix_target_probs_places_each_prefix_and_pads_with_minus_one():
    demos = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7]]  # prompt 0: 3 tokens + EOS; prompt 1: 2 tokens + EOS
    out = prefix_target_probs(
        prefix_lengths=[4, 0, 2, 0], group_index=[0, 0, 1, 1], demonstration_probs=demos, response_length=3
    )
    want = torch.tensor([[0.1, 0.2, 0.3], [-1, -1, -1], [0.5, 0.6, -1], [-1, -1, -1]])
    assert torch.equal(out, want)  # row 0 cut to the response width; row 2 a partial prefix
    with pytest.raises(
        ValueError, match="row 2 carries a demonstration prefix of 2 tokens but prompt 1 has no teacher"
    ):
        prefix_target_probs(
            prefix_lengths=[4, 0, 2, 0],
            group_index=[0, 0, 1, 1],
            demonstration_probs=[demos[0], None],
            response_length=3,
        )


class FakeEngines:
    """What generate_and_mix needs from the engine supervisor: every on-policy row generates 3 tokens + EOS."""

    restarts = 0

    def __init__(self, eos: int):
        self.eos = eos

    def generate_rollouts(self, inputs, max_new_tokens, **sampling):
        return [
            Generation(token_ids=[11, 12, 13, self.eos], logprobs=[-0.5] * 4, weight_versions=(0,) * 4) for _ in inputs
        ]


def trainer_config(tokenizer_dir: Path, train_file: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.path={tokenizer_dir}",
            f"data.train_files=[{train_file}]",
            "data.train_batch_size=2",
            "data.max_response_length=64",
            "rollout.n=4",
            "rollout.n_off_policy=1",
            "rollout.max_prefix_len=64",
            "actor.ppo_mini_batch_size=2",
            "actor.ppo_micro_batch_size=2",
            "parallel.n_gpus_per_node=2",
            "rollout.tensor_model_parallel_size=1",
            "parallel.use_distributed_optimizer=false",
            *extra,
        ],
    )


def test_trainer_batch_carries_teacher_probs_on_the_demonstration_tokens(qwen_tokenizer, tmp_path):
    """parquet -> trainer.load_data -> trainer.generate_and_mix -> RolloutBatch.target_probs -> the loss input."""
    import random

    from luffy_megatron.train.setup import load_data
    from luffy_megatron.train.step_parts import generate_and_mix

    tokenizer_dir = Path(qwen_tokenizer.name_or_path)
    counts = [num_target_tokens(qwen_tokenizer, i) for i in range(2)]
    stored = [teacher_probs(n + 1, seed=10 + i) for i, n in enumerate(counts)]
    path = write(tmp_path / "train.parquet", [row(i, stored[i]) for i in range(2)])
    cfg = trainer_config(tokenizer_dir, path, "algo.use_off_policy_probs=true")
    tokenizer, train_set, _ = load_data(cfg)
    eos = tokenizer.eos_token_id
    batch, *_ = generate_and_mix(cfg, FakeEngines(eos), tokenizer, train_set, 1, random.Random(0))
    assert batch.target_probs is not None and batch.target_probs.shape == batch.responses.shape == (8, 64)
    for r in range(8):
        p, k = r // 4, int(batch.prefix_mask[r].sum())
        if r % 4 == 0:  # the full-trace row: demonstration + EOS, each with its teacher probability
            assert k == counts[p] + 1
            assert batch.responses[r, :k].tolist() == train_set[p].demo_ids + [eos]
            assert torch.equal(batch.target_probs[r, :k], torch.tensor(stored[p], dtype=torch.float32))
        else:
            assert k == 0
        assert (batch.target_probs[r, k:] == -1).all()  # upstream's padding everywhere else
    # what the actor hands the loss for some rows (MegatronActor._backward's loss_fn)
    enabled = uses_target_probs(cfg.algo)
    assert enabled and torch.equal(
        batch.loss_target_probs([4, 0], 20, enabled=enabled), batch.target_probs[[4, 0], :20]
    )

    off_cfg = trainer_config(tokenizer_dir, path)
    _, plain_set, _ = load_data(off_cfg)
    assert all(ex.demo_probs is None for ex in plain_set)  # the column is not even read
    plain, *_ = generate_and_mix(off_cfg, FakeEngines(eos), tokenizer, plain_set, 1, random.Random(0))
    assert plain.target_probs is None and torch.equal(plain.responses, batch.responses)
    assert plain.loss_target_probs([0], 20, enabled=uses_target_probs(off_cfg.algo)) is None
    with pytest.raises(ValueError, match="algo.use_off_policy_probs=true but this RolloutBatch has no target_probs"):
        plain.check_target_probs(enabled=True)


def test_trainer_refuses_a_file_without_the_column(qwen_tokenizer, tmp_path):
    from luffy_megatron.train.setup import load_data

    path = write(tmp_path / "train.parquet", [row(0), row(1)])
    cfg = trainer_config(Path(qwen_tokenizer.name_or_path), path, "algo.use_off_policy_probs=true")
    with pytest.raises(
        DataError, match=rf"{path}: no column '{KEY}' \(data.target_probs_key\), but algo.use_off_policy_probs=true"
    ):
        load_data(cfg)


def test_config_refuses_probs_without_the_off_policy_loss():
    with pytest.raises(ConfigError, match="algo.use_off_policy_probs=true needs algo.use_off_policy_loss=true"):
        load_config(None, ["algo.use_off_policy_probs=true", "algo.use_off_policy_loss=false"])
    with pytest.raises(ConfigError, match="data.target_probs_key is empty"):
        load_config(None, ["algo.use_off_policy_probs=true", "data.target_probs_key=''"])


# ------------------------------------------------------------------------- upstream's reference vectors


def vector_batch(inputs: dict) -> RolloutBatch:
    """The case's rows as a RolloutBatch whose target_probs are built by the rollout composition from one
    demonstration per prompt (the off-policy row of each group carries it)."""
    prefix_mask = torch.tensor(inputs["prefix_mask"]).bool()
    groups = sorted(set(inputs["index"]))
    group_index = [groups.index(g) for g in inputs["index"]]
    stored = torch.tensor(inputs["target_probs"])
    demos: list = [None] * len(groups)
    for r, g in enumerate(group_index):
        k = int(prefix_mask[r].sum())
        if k:
            demos[g] = stored[r, :k].tolist()
    B, L = prefix_mask.shape
    target_probs = prefix_target_probs(
        prefix_lengths=prefix_mask.sum(-1).tolist(),
        group_index=group_index,
        demonstration_probs=demos,
        response_length=L,
    )
    return RolloutBatch(
        prompts=[[1]] * B,
        responses=torch.zeros(B, L, dtype=torch.long),
        response_mask=torch.tensor(inputs["response_mask"], dtype=torch.float32).long(),
        prefix_mask=prefix_mask,
        group_ids=list(inputs["index"]),
        target_probs=target_probs,
    )


def actor_loss(cfg, batch: RolloutBatch, inputs: dict):
    """The loss as MegatronActor computes it for one micro-batch of all rows: its options (loss_options of the
    config; gradient accumulation 1, as the vectors), the batch's masks and target probabilities."""
    opts = loss_options(cfg.algo)
    f32 = lambda k: torch.tensor(inputs[k], dtype=torch.float32)  # noqa: E731
    advantages = compute_advantages(
        token_level_rewards_BT=f32("token_level_rewards"),
        response_mask_BT=batch.response_mask,
        prefix_mask_BT=batch.prefix_mask,
        group_ids=batch.group_ids,
        **advantage_options(cfg.algo),
    )
    log_prob, entropy = f32("log_prob").requires_grad_(True), f32("entropy").requires_grad_(True)
    rows, width = list(range(batch.num_rows)), batch.response_width
    loss, metrics = microbatch_policy_loss(
        log_prob_BT=log_prob,
        entropy_BT=entropy,
        old_log_prob_BT=f32("old_log_prob"),
        advantages_BT=advantages,
        response_mask_BT=batch.response_mask,
        prefix_mask_BT=batch.prefix_mask[rows, :width],
        target_probs_BT=batch.loss_target_probs(rows, width, enabled=uses_target_probs(cfg.algo)),
        max_response_length=batch.response_width,
        **opts,
    )
    loss.backward()
    return {
        "outputs": {k: float(v) for k, v in metrics.items()},
        "advantages_col0": advantages[:, 0].tolist(),
        "grad_log_prob": log_prob.grad.tolist(),
        "grad_entropy": entropy.grad.tolist(),
    }


# our defaults are upstream's luffy_main (constant-length aggregation, p/(p+0.1), no clip, entropy 0.001)
VECTOR_CONFIG: list[str] = []


@pytest.mark.parametrize("case", ["full_trace", "partial_prefix", "no_prefix"])
def test_actor_loss_path_matches_upstream_target_probs_vectors(case):
    data = json.loads(VECTORS.read_text())
    inputs = data["inputs"][case]
    batch = vector_batch(inputs)
    # the composition rebuilds upstream's tensor exactly: teacher probs on the prefix, -1 elsewhere
    assert torch.equal(batch.target_probs, torch.tensor(inputs["target_probs"]))
    on = load_config(None, VECTOR_CONFIG + ["algo.use_off_policy_probs=true"])
    got = actor_loss(on, batch, inputs)
    assert compare(f"{case}/target_probs", got, data["results"][f"{case}/target_probs"]) == []
    # the same batch without the option is upstream's luffy_main, not the target_probs result
    off = load_config(None, VECTOR_CONFIG)
    plain = actor_loss(off, batch, inputs)
    assert compare(f"{case}/luffy_main", plain, data["results"][f"{case}/luffy_main"]) == []
    differs = compare(f"{case}/target_probs", plain, data["results"][f"{case}/target_probs"]) != []
    assert differs == (case != "no_prefix")  # without demonstration tokens the two losses are the same
