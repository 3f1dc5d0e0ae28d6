"""metrics/compute.py against numbers computed by hand and by upstream's own formulas (LUFFY
`mix_trainer.compute_data_metrics_ours` / `compute_timing_metrics`, verl `flops_counter`), and the
MetricsLogger's config text and console line."""

import json
import textwrap
from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.metrics.compute import (
    ModelFlops,
    RunPerf,
    StepTimer,
    data_metrics,
    peak_flops,
    perf_metrics,
    run_gpus,
)

# Three rows, response width 4 (= data.max_response_length), prompt limit 5:
#   row 0: demonstration prefix of 2 tokens + 2 generated, score 1 on its last token (index 3)
#   row 1: generated, 2 tokens, score 0
#   row 2: generated, 4 tokens (clipped at the width), score 1
RESP_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
PREFIX = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
SCORES = torch.tensor([[0, 0, 0, 1.0], [0, 0.0, 0, 0], [0, 0, 0, 1.0]])
ADV = torch.tensor([[0.5, 0.5, 0.5, 0.5], [-1.0, -1.0, 9.0, 9.0], [0.25, 0.25, 0.25, 0.25]])  # 9: padding, not counted
PROMPTS = [3, 5, 4]


def _metrics(**kw):
    args = dict(
        token_scores_BT=SCORES,
        advantages_BT=ADV,
        response_mask_BT=RESP_MASK,
        prefix_mask_BT=PREFIX,
        prompt_lengths=PROMPTS,
        max_prompt_length=5,
        max_response_length=4,
    )
    return data_metrics(**{**args, **kw})


def test_data_metrics_by_hand():
    m = _metrics()
    assert m["critic/score/mean"] == pytest.approx(2 / 3)
    assert (m["critic/score/max"], m["critic/score/min"]) == (1.0, 0.0)
    # no KL penalty: the rewards are the scores
    assert [m[f"critic/rewards/{s}"] for s in ("mean", "max", "min")] == [
        m[f"critic/score/{s}"] for s in ("mean", "max", "min")
    ]
    # advantages over the 10 valid tokens: 4 x 0.5, 2 x -1, 4 x 0.25 (the 9s are padding)
    assert m["critic/advantages/mean"] == pytest.approx((2.0 - 2.0 + 1.0) / 10)
    assert (m["critic/advantages/max"], m["critic/advantages/min"]) == (0.5, -1.0)
    assert m["response_length/mean"] == pytest.approx(10 / 3)
    assert (m["response_length/max"], m["response_length/min"]) == (4.0, 2.0)
    assert m["response_length/clip_ratio"] == pytest.approx(2 / 3)  # rows 0 and 2 reach the width
    assert m["prompt_length/mean"] == pytest.approx(4.0)
    assert (m["prompt_length/max"], m["prompt_length/min"]) == (5.0, 3.0)
    assert m["prompt_length/clip_ratio"] == pytest.approx(1 / 3)
    # upstream LUFFY's on/off split: row 0 is the demonstration
    assert m["on_off_metrics/off_score"] == 1.0 and m["on_off_metrics/on_score"] == pytest.approx(0.5)
    assert m["on_off_metrics/off_response_length_mean"] == 4.0 and m["on_off_metrics/on_response_length_mean"] == 3.0
    assert m["on_off_metrics/off_on_example_ratio"] == pytest.approx(0.5)


def test_rewards_follow_the_kl_penalised_tensor_not_the_scores():
    penalty = 0.1 * RESP_MASK.float()  # a per-token KL penalty on every valid token
    m = _metrics(token_rewards_BT=SCORES - penalty)
    assert m["critic/score/mean"] == pytest.approx(2 / 3)
    assert m["critic/rewards/mean"] == pytest.approx((0.6 - 0.2 + 0.6) / 3)
    assert m["critic/rewards/min"] == pytest.approx(-0.2) and m["critic/rewards/max"] == pytest.approx(0.6)


def test_a_batch_without_demonstrations_has_no_off_policy_side():
    m = _metrics(prefix_mask_BT=torch.zeros_like(PREFIX))
    assert "on_off_metrics/off_score" not in m and m["on_off_metrics/off_on_example_ratio"] == 0.0
    with pytest.raises(ValueError, match="prompt lengths"):
        _metrics(prompt_lengths=[1, 2])


def _upstream_compute_data_metrics_ours(batch):
    """The formulas of upstream LUFFY's `compute_data_metrics_ours` (mix_trainer.py, use_critic=False) on
    verl's layout: attention_mask = [left-padded prompt | right-padded response]."""
    sequence_score = batch["token_level_scores"].sum(-1)
    sequence_reward = batch["token_level_rewards"].sum(-1)
    max_response_length = batch["responses"].shape[-1]
    prompt_mask = batch["attention_mask"][:, :-max_response_length].bool()
    response_mask = batch["attention_mask"][:, -max_response_length:].bool()
    max_prompt_length = prompt_mask.size(-1)
    prompt_length = batch["attention_mask"][:, :-max_response_length].sum(-1).float()
    response_length = batch["attention_mask"][:, -max_response_length:].sum(-1).float()
    off = batch["prefix_mask"].any(-1)
    on = ~off
    valid_adv = torch.masked_select(batch["advantages"], response_mask)
    return {
        "critic/score/mean": torch.mean(sequence_score).item(),
        "critic/score/max": torch.max(sequence_score).item(),
        "critic/score/min": torch.min(sequence_score).item(),
        "critic/rewards/mean": torch.mean(sequence_reward).item(),
        "critic/rewards/max": torch.max(sequence_reward).item(),
        "critic/rewards/min": torch.min(sequence_reward).item(),
        "critic/advantages/mean": torch.mean(valid_adv).item(),
        "critic/advantages/max": torch.max(valid_adv).item(),
        "critic/advantages/min": torch.min(valid_adv).item(),
        "response_length/mean": torch.mean(response_length).item(),
        "response_length/max": torch.max(response_length).item(),
        "response_length/min": torch.min(response_length).item(),
        "response_length/clip_ratio": torch.mean(torch.eq(response_length, max_response_length).float()).item(),
        "on_off_metrics/on_response_length_mean": torch.mean(response_length[on]).item(),
        "on_off_metrics/off_response_length_mean": torch.mean(response_length[off]).item(),
        "on_off_metrics/on_score": torch.mean(sequence_score[on]).item(),
        "on_off_metrics/off_score": torch.mean(sequence_score[off]).item(),
        "on_off_metrics/off_on_example_ratio": off.sum().item() / on.sum().item(),
        "prompt_length/mean": torch.mean(prompt_length).item(),
        "prompt_length/max": torch.max(prompt_length).item(),
        "prompt_length/min": torch.min(prompt_length).item(),
        "prompt_length/clip_ratio": torch.mean(torch.eq(prompt_length, max_prompt_length).float()).item(),
    }


def test_data_metrics_equal_upstreams_formulas_on_a_random_batch():
    g = torch.Generator().manual_seed(0)
    rows, width, max_prompt = 16, 12, 10
    resp_len = torch.randint(1, width + 1, (rows,), generator=g)
    resp_len[:3] = width  # some clipped responses
    prompt_len = torch.randint(1, max_prompt + 1, (rows,), generator=g)
    prompt_len[0] = max_prompt
    resp_mask = torch.arange(width)[None, :] < resp_len[:, None]
    prefix = torch.zeros(rows, width, dtype=torch.bool)
    prefix[::4, :2] = True  # every 4th row carries a demonstration prefix
    scores = torch.zeros(rows, width)
    scores[torch.arange(rows), resp_len - 1] = torch.randint(0, 2, (rows,), generator=g).float()
    rewards = scores - 0.05 * torch.rand(rows, width, generator=g) * resp_mask  # a KL-penalised copy
    adv = torch.randn(rows, width, generator=g)
    prompt_mask = torch.arange(max_prompt)[None, :] >= (max_prompt - prompt_len)[:, None]  # left padding
    upstream = _upstream_compute_data_metrics_ours(
        {
            "token_level_scores": scores,
            "token_level_rewards": rewards,
            "advantages": adv,
            "responses": torch.zeros(rows, width),
            "prefix_mask": prefix,
            "attention_mask": torch.cat([prompt_mask, resp_mask], dim=1).long(),
        }
    )
    ours = data_metrics(
        token_scores_BT=scores,
        token_rewards_BT=rewards,
        advantages_BT=adv,
        response_mask_BT=resp_mask,
        prefix_mask_BT=prefix,
        prompt_lengths=prompt_len.tolist(),
        max_prompt_length=max_prompt,
        max_response_length=width,
    )
    assert set(upstream) <= set(ours)
    for key, value in upstream.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_step_timer_phases_add_up_and_count_a_failing_phase():
    clock = FakeClock()
    timer = StepTimer(clock)
    with timer("gen"):
        clock.t += 2.0
    with timer("sync"):
        clock.t += 0.5
    with timer("sync"):  # timed twice in a step: the seconds add up
        clock.t += 0.25
    with pytest.raises(RuntimeError):
        with timer("update_actor"):
            clock.t += 1.0
            raise RuntimeError("rank failed")
    clock.t += 0.25
    assert timer.finish() == pytest.approx(4.0)
    m = timer.metrics(prompt_tokens=300, response_tokens=100)
    assert m["timing_s/gen"] == 2.0 and m["timing_s/sync"] == 0.75 and m["timing_s/update_actor"] == 1.0
    assert m["timing_s/step"] == 4.0
    # upstream compute_timing_metrics: gen per response token, update_actor per prompt + response token
    assert m["timing_per_token_ms/gen"] == pytest.approx(2.0 * 1000 / 100)
    assert m["timing_per_token_ms/update_actor"] == pytest.approx(1.0 * 1000 / 400)


def _tiny_llama(tmp_path, *, vocab=1000, tied=True):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": vocab,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "tie_word_embeddings": tied,
                "torch_dtype": "float32",
            }
        )
    )
    return str(tmp_path)


def test_model_flops_from_the_architecture_by_hand(tmp_path):
    flops = ModelFlops.of_model(_tiny_llama(tmp_path))
    # per layer: qkv 64 x (2 + 2 x 2) x 32 + out 2 x 32 x 64 + SwiGLU 3 x 64 x 128 = 40960; output layer:
    # vocab 1000 padded to 1024 (megatron, multiple of 128) x 64
    assert flops.matmul_params == 2 * 40960 + 1024 * 64
    assert flops.attention_coef == 2 * 32 * 2  # heads x head_dim x layers
    seqs = [10, 30]
    n = flops.matmul_params
    attention = 2 * 128 * (10**2 + 30**2)  # causal forward: 2 x coef x S^2 per sequence
    assert flops.forward(seqs) == pytest.approx(2 * n * 40 + attention)
    assert flops.update(seqs) == pytest.approx(6 * n * 40 + 3 * attention)
    assert flops.update(seqs, epochs=2) == pytest.approx(2 * flops.update(seqs))
    # verl's FlopsCounter (used for upstream's mfu/actor) counts the same dense matmuls plus the embedding
    # lookup (vocab x hidden twice, unpadded) and non-causal attention (12 x S^2 x head_dim x heads x layers)
    verl_dense = 6 * (2 * 40960 + 1000 * 64 * 2) * 40
    verl_attention = 12 * (10**2 + 30**2) * 32 * 2 * 2
    assert flops.update(seqs) < verl_dense + verl_attention


def test_peak_flops_by_device_name_and_none_without_a_known_gpu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops(None) is None and peak_flops("") is None
    assert peak_flops("NVIDIA GeForce RTX 3090") is None


def test_perf_metrics_throughput_and_mfu_by_hand():
    flops = ModelFlops(matmul_params=1_000_000, attention_coef=100)
    seqs = [100, 300]
    seconds = {"step": 8.0, "old_log_prob": 0.5, "update_actor": 1.5}
    m = perf_metrics(
        sequence_lengths=seqs, seconds=seconds, num_gpus=4, train_gpus=2, flops=flops, peak=1e9, ppo_epochs=1
    )
    assert m["perf/total_num_tokens"] == 400
    assert m["perf/throughput"] == pytest.approx(400 / 8.0 / 4)  # tokens / step seconds / GPUs of the run
    fwd = 2 * 1e6 * 400 + 2 * 100 * (100**2 + 300**2)
    upd = 3 * fwd
    assert m["perf/mfu"] == pytest.approx((fwd + upd) / 2.0 / 2 / 1e9)  # per trainer GPU, over the two phases
    assert m["mfu/actor"] == pytest.approx(upd / 1.5 / 2 / 1e9)
    cpu = perf_metrics(sequence_lengths=seqs, seconds=seconds, num_gpus=1, train_gpus=1, flops=flops, peak=None)
    assert "perf/mfu" not in cpu and "mfu/actor" not in cpu and cpu["perf/throughput"] == pytest.approx(50.0)


def test_run_gpus_and_run_perf_on_cpu_log_no_mfu():
    cpu = SimpleNamespace(uses_gpus=False, world_size=2, num_gpus=0)
    assert run_gpus(cpu) == (2, 2)  # a CPU run: per Megatron rank
    disagg = SimpleNamespace(uses_gpus=True, world_size=16, num_gpus=24)  # 16 training + 8 rollout GPUs
    assert run_gpus(disagg) == (24, 16)
    cfg = SimpleNamespace(
        model=SimpleNamespace(path="/nonexistent"),
        parallel=SimpleNamespace(tensor_model_parallel_size=1),
        actor=SimpleNamespace(ppo_epochs=1),
    )
    perf = RunPerf.of_run(cfg, cpu, None)
    assert perf.peak is None and perf.flops is None
    unknown = RunPerf.of_run(cfg, disagg, "NVIDIA GeForce RTX 3090")  # no made-up peak
    assert unknown.peak is None and unknown.flops is None


def test_run_perf_step_metrics_of_a_batch(tmp_path):
    from luffy_megatron.actor.batching import RolloutBatch

    batch = RolloutBatch(
        prompts=[[1, 2, 3], [4, 5, 6, 7, 8]],
        responses=torch.zeros(2, 4, dtype=torch.long),
        response_mask=RESP_MASK[:2],
        prefix_mask=PREFIX[:2],
        group_ids=[0, 0],
    )
    cfg = SimpleNamespace(
        model=SimpleNamespace(path=_tiny_llama(tmp_path)),
        parallel=SimpleNamespace(tensor_model_parallel_size=1),
        actor=SimpleNamespace(ppo_epochs=1),
    )
    perf = RunPerf.of_run(cfg, SimpleNamespace(uses_gpus=True, world_size=1, num_gpus=1), "NVIDIA H200")
    clock = FakeClock()
    timer = StepTimer(clock)
    for phase, s in (("gen", 1.0), ("old_log_prob", 0.25), ("update_actor", 0.75)):
        with timer(phase):
            clock.t += s
    m = perf.step_metrics(batch, timer)
    tokens = 3 + 4 + 5 + 2
    assert m["timing_s/step"] == 2.0 and m["perf/throughput"] == pytest.approx(tokens / 2.0)
    seqs = [7, 7]
    expected = (perf.flops.forward(seqs) + perf.flops.update(seqs)) / 1.0 / 989e12
    assert m["perf/mfu"] == pytest.approx(expected)
    assert m["timing_per_token_ms/gen"] == pytest.approx(1000 / 6)


def test_microbatch_loss_reports_the_token_mean_entropy():
    from luffy_megatron.algo.loss import microbatch_policy_loss

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    entropy = torch.tensor([[1.0, 2.0, 50.0], [3.0, 70.0, 80.0]])
    zeros = torch.zeros(2, 3)
    _, metrics = microbatch_policy_loss(
        log_prob_BT=zeros - 1,
        entropy_BT=entropy,
        old_log_prob_BT=zeros - 1,
        advantages_BT=zeros,
        response_mask_BT=mask,
        prefix_mask_BT=torch.zeros(2, 3, dtype=torch.bool),
        max_response_length=3,
    )
    assert float(metrics["entropy"]) == pytest.approx(2.0)  # (1 + 2 + 3) / 3 valid tokens
    assert float(metrics["entropy_loss"]) == float(metrics["entropy"])  # upstream's name for the same number


def test_metrics_logger_writes_the_whole_config_as_text(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from luffy_megatron.config import load_config
    from luffy_megatron.metrics.sinks import MetricsLogger

    cfg = load_config(None, ["trainer.total_training_steps=3", "actor.lr=2.5e-6", "data.train_files=[a.parquet]"])
    logger = MetricsLogger(tmp_path / "tb", tmp_path / "metrics.jsonl", total_steps=3, config=cfg)
    logger.log(1, {"critic/score/mean": 0.5, "actor/entropy": 1.25, "perf/throughput": 321.0, "nan": float("nan")})
    logger.close()
    line = capsys.readouterr().err
    assert "[step 1/3] score=0.5  entropy=1.25  321 tok/s/GPU" in line
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"critic/score/mean", "actor/entropy", "perf/throughput"}  # NaN dropped
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    recipe = tmp_path / "from_tensorboard.yaml"
    recipe.write_text(textwrap.dedent(text))
    assert load_config(str(recipe)) == cfg  # the whole config, loadable as a recipe
    assert text.splitlines()[0] == "    # luffy-megatron / luffy"  # logging.project_name / experiment_name
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1,
        "critic/score/mean": 0.5,
        "actor/entropy": 1.25,
        "perf/throughput": 321.0,
    }


def test_console_line_every_log_every_steps_and_the_last_step(tmp_path, capsys):
    from luffy_megatron.config import load_config
    from luffy_megatron.metrics.sinks import MetricsLogger, read_metrics

    cfg = load_config(
        None, ["logging.log_every_steps=3", "logging.experiment_name=try", "data.train_files=[a.parquet]"]
    )
    logger = MetricsLogger(tmp_path / "tb", tmp_path / "metrics.jsonl", total_steps=7, config=cfg)
    for step in range(1, 8):
        logger.log(step, {"critic/score/mean": step / 10})
    logger.close()
    shown = [int(line.split("/")[0].removeprefix("[step ")) for line in capsys.readouterr().err.splitlines()]
    assert shown == [3, 6, 7]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 8))  # every step kept


def test_results_plot_reads_todays_and_older_metric_names(tmp_path):
    from luffy_megatron.metrics.sinks import first_logged, plot_results

    old = [{"step": 1, "rollout/reward_mean": 0.25, "actor/entropy_loss": 1.0}]  # a run from before the rename
    new = [{"step": 1, "critic/score/mean": 0.5, "rollout/reward_mean": 0.5, "actor/entropy": 1.0}]
    assert first_logged(old, ("critic/score/mean", "rollout/reward_mean")) == "rollout/reward_mean"
    assert first_logged(new, ("critic/score/mean", "rollout/reward_mean")) == "critic/score/mean"
    assert first_logged(old, ("actor/entropy", "actor/entropy_loss")) == "actor/entropy_loss"
    assert first_logged(old, ("val/test_score/avg",)) is None
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in old + [{**new[0], "step": 2, "val/test_score/avg": 0.3}]))
    assert plot_results(path, tmp_path / "results.png").stat().st_size > 10_000


def test_read_metrics_skips_a_torn_last_line_and_counts_it(tmp_path, caplog):
    from luffy_megatron.metrics.sinks import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 0.5}\n[1, 2]\n{"step": 2, "a": 0.25}\n{"step": 3, "a')  # crash mid-write
    with caplog.at_level("WARNING", logger="luffy.metrics"):
        assert read_metrics(path) == [{"step": 1, "a": 0.5}, {"step": 2, "a": 0.25}]
    assert "skipped 2 line(s) that do not decode" in caplog.text


def test_a_resumed_logger_drops_the_steps_it_redoes_from_the_jsonl_and_tensorboard(tmp_path, caplog):
    """A run logged steps 0..4 and crashed while writing step 5; it resumes from its checkpoint of step 2:
    steps 3 and 4 of the first run are gone from metrics.jsonl (rewritten atomically, the torn line too) and
    from TensorBoard (purge_step), so every step appears once, with the resumed run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from luffy_megatron.metrics.sinks import MetricsLogger, read_metrics

    jsonl, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    first = MetricsLogger(tb, jsonl, total_steps=6, console=False, start_step=0)
    for step in range(5):
        first.log(step, {"critic/score/mean": float(step)})
    first.close()
    with jsonl.open("a") as f:
        f.write('{"step": 5, "critic/sc')  # torn by the crash: no newline
    with caplog.at_level("WARNING", logger="luffy.metrics"):
        resumed = MetricsLogger(tb, jsonl, total_steps=6, console=False, start_step=2)
    assert "dropped 2 row(s) after step 2" in caplog.text and "1 line(s) that do not decode" in caplog.text
    for step in range(3, 7):
        resumed.log(step, {"critic/score/mean": 10.0 + step})
    resumed.close()
    assert [(r["step"], r["critic/score/mean"]) for r in read_metrics(jsonl)] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 13.0),
        (4, 14.0),
        (5, 15.0),
        (6, 16.0),
    ]
    assert len(jsonl.read_text().splitlines()) == 7  # no torn line left
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("critic/score/mean")] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
        (3, 13.0),
        (4, 14.0),
        (5, 15.0),
        (6, 16.0),
    ]


def test_a_failing_results_plot_only_warns(tmp_path, caplog):
    from luffy_megatron.metrics.sinks import plot_results_or_warn

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "critic/score/mean": 0.5}\n')
    with caplog.at_level("WARNING", logger="luffy.metrics"):
        assert plot_results_or_warn(path, tmp_path / "missing_dir" / "results.png") is None
    assert "the results plot" in caplog.text and "was not written" in caplog.text
    assert plot_results_or_warn(path, tmp_path / "results.png") == tmp_path / "results.png"
