"""A fixed tiny batch and config for actor tests, and an independent HF + torch reference update."""

from __future__ import annotations

import torch

from luffy_megatron.actor.batching import RolloutBatch
from luffy_megatron.algo import compute_advantages, microbatch_policy_loss
from luffy_megatron.algo.logprob import naive_logprob_entropy

N = 4  # rows per prompt
WIDTH = 8  # max_response_length
LR = 1e-3
# Adam's first step is lr * g / (|g| + eps): for elements with |g| near eps it amplifies fp32 round-off of
# the gradient. A larger eps keeps the weight comparison well-conditioned; it changes nothing checked.
ADAM_EPS = 1e-4
KL_LOSS_COEF = 1.0  # the KL-loss checks (algo.use_kl_loss, low_var_kl) in actor_checks.py


def actor_overrides(*, world: int, tp: int = 1, pp: int = 1) -> list[str]:
    return [
        f"parallel.n_gpus_per_node={world}",
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        "parallel.use_distributed_optimizer=false",
        "model.dtype=fp32",
        "model.transformer_impl=local",
        "model.make_vocab_size_divisible_by=64",
        f"rollout.n={N}",
        "rollout.n_off_policy=1",
        "rollout.tensor_model_parallel_size=1",
        "data.train_batch_size=2",
        "data.max_prompt_length=8",
        f"data.max_response_length={WIDTH}",
        "actor.ppo_mini_batch_size=2",
        "actor.ppo_max_token_len_per_gpu=4096",
        "actor.log_prob_chunk_tokens=7",
        f"actor.lr={LR}",
        f"actor.adam_eps={ADAM_EPS}",
        "actor.grad_clip=1.0",
        "algo.entropy_coeff=0.01",
        "trainer.total_training_steps=10",
    ]


def make_batch(vocab: int = 500, seed: int = 0, *, with_target_probs: bool = False) -> RolloutBatch:
    """2 prompts x 4 rows; row 0 of each group is a full demonstration (prefix_mask on its tokens).
    `with_target_probs`: teacher probabilities on the demonstration tokens, -1 elsewhere (algo.use_off_policy_probs)."""
    g = torch.Generator().manual_seed(seed)
    prompts, lengths = [], []
    for r in range(2 * N):
        p_len = 3 + (r // N) * 2
        prompts.append(torch.randint(1, vocab, (p_len,), generator=g).tolist())
        lengths.append(int(torch.randint(2, WIDTH + 1, (1,), generator=g)))
    responses = torch.randint(1, vocab, (2 * N, WIDTH), generator=g)
    mask = (torch.arange(WIDTH).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    prefix = torch.zeros(2 * N, WIDTH, dtype=torch.bool)
    for grp in range(2):
        prefix[grp * N] = mask[grp * N].bool()
    # the prompts of a group are the same prompt
    for r in range(2 * N):
        prompts[r] = prompts[(r // N) * N]
    target_probs = None
    if with_target_probs:
        # about as unlikely as the random tiny model finds its tokens (p ~ 1/vocab): the ratio p / teacher is O(1)
        teacher = torch.rand(2 * N, WIDTH, generator=torch.Generator().manual_seed(seed + 1)) * 0.004 + 0.001
        target_probs = torch.where(prefix, teacher, torch.full_like(teacher, -1.0))
    return RolloutBatch(prompts=prompts, responses=responses * mask, response_mask=mask, prefix_mask=prefix,
                        group_ids=[r // N for r in range(2 * N)], target_probs=target_probs)


def reference_token_scores(batch: RolloutBatch) -> torch.Tensor:
    """Fixed 0/1 scores of the rows, on each row's last valid token (as the trainer's grading puts them)."""
    rewards = torch.zeros(batch.num_rows, batch.response_width)
    scores = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    for i, n in enumerate(batch.response_lengths()):
        rewards[i, n - 1] = scores[i]
    return rewards


def reference_advantages(batch: RolloutBatch) -> torch.Tensor:
    rewards = reference_token_scores(batch)
    return compute_advantages(token_level_rewards_BT=rewards, response_mask_BT=batch.response_mask, prefix_mask_BT=batch.prefix_mask, group_ids=batch.group_ids)


def hf_token_logprobs(model, batch: RolloutBatch, temperature: float = 1.0):
    """Full-vocabulary log-probs/entropies of each response token from a transformers model, [B, L]."""
    lp_out = torch.zeros(batch.num_rows, batch.response_width)
    ent_out = torch.zeros_like(lp_out)
    lps, ents = [], []
    for i, n in enumerate(batch.response_lengths()):
        ids = torch.tensor([batch.prompts[i] + batch.responses[i, :n].tolist()])
        logits = model(ids).logits[0]
        p = len(batch.prompts[i])
        lp, ent = naive_logprob_entropy(logits[p - 1 : p - 1 + n], ids[0, p : p + n], temperature=temperature)
        lps.append((i, n, lp))
        ents.append(ent)
    return lps, ents


def reference_update(hf_dir, batch: RolloutBatch, advantages: torch.Tensor, old_lp: torch.Tensor, *, entropy_coeff: float = 0.01, dp_parts=None,
                     use_target_probs: bool = False):
    """One LUFFY step the plain way: transformers model, full logits, the algorithm core, torch AdamW.
    `use_target_probs`: upstream's off-policy ratio with the batch's teacher probabilities.

    `dp_parts`: row sets of data-parallel ranks. Upstream semantics: each rank's loss is its own token
    sum / L (one micro-batch here), and gradients are AVERAGED over ranks, so with W ranks the step
    follows (1/W) * sum of the ranks' losses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    lps, ents = hf_token_logprobs(model, batch)
    B, L = batch.num_rows, batch.response_width
    lp_BT = torch.zeros(B, L)
    ent_BT = torch.zeros(B, L)
    lp_BT = torch.stack([torch.cat([lp, lp.new_zeros(L - n)]) for _, n, lp in lps])
    ent_BT = torch.stack([torch.cat([e, e.new_zeros(L - n)]) for (_, n, _), e in zip(lps, ents)])
    parts = dp_parts or [list(range(B))]
    loss, pg = 0.0, 0.0
    for rows in parts:
        part_loss, metrics = microbatch_policy_loss(
            log_prob_BT=lp_BT[rows], entropy_BT=ent_BT[rows], old_log_prob_BT=old_lp[rows], advantages_BT=advantages[rows],
            response_mask_BT=batch.response_mask[rows], prefix_mask_BT=batch.prefix_mask[rows], max_response_length=L,
            entropy_coeff=entropy_coeff, target_probs_BT=batch.target_probs[rows] if use_target_probs else None,
        )
        loss = loss + part_loss / len(parts)
        pg += metrics["pg_loss"].item() / len(parts)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.01)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"loss": loss.item(), "pg_loss": pg, "grads": grads, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}
