"""What the miniature measures on a policy (tools/experiment.py): held-out accuracy as luffy-eval grades it, the
share of answers that use the demonstrated procedure, and the entropy probe with the KL to the base.

Generation is done by the run's own vLLM engine (it holds the actor's weights after each trained chunk);
grading by luffy-eval's lenient grading (`eval.grading_text` + the `math` grader in a `RewardPool`). The probe
is the same for every arm: the policy's own temperature-1 generations on fixed ID prompts, scored by the
policy's exported weights and the base's in transformers, token by token over the whole vocabulary."""

from __future__ import annotations

from pathlib import Path

from luffy_megatron import eval as luffy_eval
from tools.experiment_task import SPLITS, chain_steps, starts_rewrite, uses_procedure

EVAL_TEMPERATURE = 0.6  # luffy-eval's default (LUFFY's final protocol)


class HeldOut:
    """The held-out splits as luffy-eval loads and prompts them (no system prompt, the default chat template)."""

    def __init__(self, paths: dict[str, Path], tokenizer, max_new_tokens: int):
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        loaded = luffy_eval.load_benchmarks([str(paths[s]) for s in SPLITS], data_root=None, limit=None, n_samples="1")
        self.benchmarks = dict(zip(SPLITS, loaded))
        luffy_eval.build_prompts(loaded, tokenizer, keep_system_prompt=False, chat_template=None)

    def generate(self, fleet, split: str, *, limit: int | None, k: int, temperature: float, seed: int):
        """`k` samples of each of the split's first `limit` problems: (rows, texts), sample-major."""
        bench = self.benchmarks[split]
        rows = bench.rows[:limit] if limit else bench.rows
        prompts = (bench.prompt_ids[:limit] if limit else bench.prompt_ids) * k
        outputs = fleet.generate(
            prompts, [self.max_new_tokens] * len(prompts), temperature=temperature, top_p=1.0, top_k=-1, seed=seed
        )
        return rows * k, prompts, outputs, [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]

    def evaluate(self, fleet, pool, *, splits, limit: int | None, k: int, seed: int) -> dict[str, dict]:
        """Per split: accuracy (%, avg@k), per_problem (mean score per problem, in file order), procedure (% of
        samples using the rewrite chain), rewrite_start (% starting a rewrite)."""
        out = {}
        for n, split in enumerate(splits):
            rows, _, _, texts = self.generate(
                fleet, split, limit=limit, k=k, temperature=EVAL_TEMPERATURE, seed=seed + 7919 * n
            )
            scores = pool.grade(
                [(luffy_eval.grading_text(t), row["answer"]) for t, row in zip(texts, rows)],
                grader=luffy_eval.GRADERS_BY_KIND["math"],
            )
            agg = luffy_eval.aggregate([row["index"] for row in rows], scores)
            out[split] = {
                "accuracy": agg["accuracy"],
                "per_problem": [p["mean"] for p in agg["per_problem"]],
                "procedure": 100.0 * sum(uses_procedure(t, r["problem"]) for t, r in zip(texts, rows)) / len(texts),
                "rewrite_start": 100.0 * sum(map(starts_rewrite, texts)) / len(texts),
                "example": {"problem": rows[0]["problem"], "response": texts[0], "score": scores[0]},
            }
        return out

    def gate_samples(self, fleet, *, seed: int) -> dict[str, float]:
        """The base's temperature-1 samples on every ID prompt: % that start a rewrite (rewrite_start), % whose
        chain has 2 or more steps (no_chains), as the gates of the same names read them."""
        _, _, _, texts = self.generate(fleet, "id", limit=None, k=1, temperature=1.0, seed=seed)
        return {
            "rewrite_start": 100.0 * sum(map(starts_rewrite, texts)) / len(texts),
            "no_chains": 100.0 * sum(chain_steps(t) >= 2 for t in texts) / len(texts),
        }


class Probe:
    """Entropy of the policy on its own temperature-1 generations for fixed ID prompts (token mean over the
    generated tokens), and the token-mean KL(policy || base) on the same tokens, both over the full vocabulary."""

    def __init__(self, held_out: HeldOut, base_dir: Path, *, num_prompts: int):
        from transformers import AutoModelForCausalLM  # lazy: torch and transformers load only for a run

        self.held_out, self.num_prompts = held_out, num_prompts
        self.base = AutoModelForCausalLM.from_pretrained(base_dir).eval()

    def measure(self, fleet, policy_dir: Path, *, seed: int) -> dict[str, float]:
        import torch  # lazy: torch loads only for a run
        from transformers import AutoModelForCausalLM  # lazy: as above

        _, prompts, outputs, texts = self.held_out.generate(
            fleet, "id", limit=self.num_prompts, k=1, temperature=1.0, seed=seed
        )
        policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
        entropy_sum, kl_sum, tokens = 0.0, 0.0, 0
        with torch.no_grad():
            for prompt, generated in zip(prompts, outputs):
                if not generated:
                    continue
                ids = torch.tensor([list(prompt) + list(generated)])
                span = slice(len(prompt) - 1, ids.shape[1] - 1)  # the logits that predict the generated tokens
                logp = torch.log_softmax(policy(ids).logits[0, span].float(), -1)
                logq = torch.log_softmax(self.base(ids).logits[0, span].float(), -1)
                p = logp.exp()
                entropy_sum += float(-(p * logp).sum())
                kl_sum += float((p * (logp - logq)).sum())
                tokens += len(generated)
        return {
            "probe_entropy": entropy_sum / max(tokens, 1),
            "kl_to_base": kl_sum / max(tokens, 1),
            "probe_tokens": tokens,
            "probe_rewrite_start": 100.0 * sum(map(starts_rewrite, texts)) / len(texts),
        }
