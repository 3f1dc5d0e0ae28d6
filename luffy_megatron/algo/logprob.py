"""Per-token log-probabilities and entropies from vocab-parallel logits, chunked, with their own backward.

The naive path (`log_softmax(logits.float() / T)`, gather, `softmax * log_softmax` for the entropy) keeps
several full-vocabulary fp32 copies of the logits alive for autograd: at 151,936 vocabulary entries and
32k tokens per GPU each copy is ~20 GB. This is where Megatron RL frameworks run out of memory.

Here the logits stay in their own dtype and shape ([tokens, local vocab shard] under tensor parallelism).
Forward walks over chunks of tokens, making an fp32 copy of one chunk at a time, and keeps only three
numbers per token (log-sum-exp, E_p[x], and the target logit's share). Backward recomputes the softmax of
each chunk and writes the gradient of the logits, by default in place over the logits buffer (the logits
are not needed again after this function; Megatron's own vocab-parallel cross entropy does the same).

With x = logits / temperature, p = softmax(x), and y the target:
    logp_y  = x_y - lse(x)                     d logp_y / d x_j = 1[j = y] - p_j
    H       = lse(x) - E_p[x]                  d H / d x_j      = -p_j (x_j - E_p[x])
Temperature is applied as upstream (logits divided by it before the log-softmax, for log-probs and entropy).
Under tensor parallelism each rank holds a contiguous vocabulary slice [vocab_start, vocab_start + V_local);
max, sums and the target logit are all-reduced over the TP group, so no rank gathers the vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


# Logit given to vocabulary padding (ids >= valid_vocab_size): exp() of it is exactly 0, and unlike -inf
# it stays finite through the backward's (x - E[x]) * p products.
_PAD_LOGIT = -1e30


def _scaled_chunk(logits: Tensor, start: int, end: int, temperature: float, pad_from: int) -> Tensor:
    """fp32 copy of logits[start:end] / temperature, with local columns >= pad_from masked out."""
    x = logits[start:end].float() / temperature
    if pad_from < x.shape[-1]:
        x[:, max(pad_from, 0) :] = _PAD_LOGIT
    return x


def _chunk_stats(x: Tensor, target: Tensor, vocab_start: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """For an fp32 chunk x [C, V_local]: global lse, global E_p[x], and the global target logit."""
    local_max = x.max(dim=-1).values
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    shifted = x - global_max.unsqueeze(-1)
    exp = shifted.exp_()  # reuse the buffer: `shifted` is not needed again
    sums = torch.stack([exp.sum(-1), (exp * x).sum(-1)], dim=0)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    sum_exp, sum_exp_x = sums[0], sums[1]
    lse = global_max + sum_exp.log()
    mean_x = sum_exp_x / sum_exp
    local_target = target - vocab_start
    in_shard = (local_target >= 0) & (local_target < x.shape[-1])
    idx = local_target.clamp(0, x.shape[-1] - 1).unsqueeze(-1)
    target_logit = torch.where(in_shard, x.gather(-1, idx).squeeze(-1), torch.zeros_like(lse))
    _all_reduce(target_logit, dist.ReduceOp.SUM, group)
    return lse, mean_x, target_logit


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, chunk_tokens, vocab_start, pad_from, group, inplace_backward):
        num_tokens = logits.shape[0]
        logp = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        lse_all = torch.empty_like(logp)
        mean_all = torch.empty_like(logp)
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            x = _scaled_chunk(logits, start, end, temperature, pad_from)
            lse, mean_x, target_logit = _chunk_stats(x, target[start:end], vocab_start, group)
            logp[start:end] = target_logit - lse
            entropy[start:end] = lse - mean_x
            lse_all[start:end] = lse
            mean_all[start:end] = mean_x
        ctx.save_for_backward(logits, target, lse_all, mean_all)
        ctx.settings = (temperature, chunk_tokens, vocab_start, pad_from, inplace_backward)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, target, lse_all, mean_all = ctx.saved_tensors
        temperature, chunk_tokens, vocab_start, pad_from, inplace = ctx.settings
        grad = logits if inplace else torch.empty_like(logits)
        v_local = logits.shape[-1]
        g_logp = grad_logp if grad_logp is not None else torch.zeros_like(lse_all)
        g_ent = grad_entropy if grad_entropy is not None else torch.zeros_like(lse_all)
        for start in range(0, logits.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, logits.shape[0])
            x = _scaled_chunk(logits, start, end, temperature, pad_from)
            p = (x - lse_all[start:end].unsqueeze(-1)).exp_()
            gl = g_logp[start:end].unsqueeze(-1)
            ge = g_ent[start:end].unsqueeze(-1)
            # d/dx = g_logp * (onehot - p) - g_H * p * (x - E_p[x])
            x.sub_(mean_all[start:end].unsqueeze(-1)).mul_(ge).add_(gl)  # x <- g_H (x - E[x]) + g_logp
            gx = p.mul_(x).neg_()
            local_target = target[start:end] - vocab_start
            in_shard = (local_target >= 0) & (local_target < v_local)
            rows = torch.nonzero(in_shard, as_tuple=True)[0]
            gx[rows, local_target[rows]] += g_logp[start:end][rows]
            grad[start:end] = (gx / temperature).to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits_TV: Tensor,
    target_T: Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    vocab_start: int = 0,
    valid_vocab_size: int | None = None,
    tp_group=None,
    inplace_backward: bool = True,
) -> tuple[Tensor, Tensor]:
    """Log-prob of `target_T` and entropy per token, both fp32 [T], from logits [T, V_local].

    `vocab_start`: first vocabulary id of this rank's shard (0 without tensor parallelism).
    `valid_vocab_size`: ids at or above it are Megatron's vocabulary padding and get probability 0
    (None: every column is real). `inplace_backward` lets the
    backward overwrite the logits buffer with its gradient: set it False if the logits are used again.
    """
    if logits_TV.dim() != 2 or target_T.shape != logits_TV.shape[:1]:
        raise ValueError(
            f"expected logits [T, V] and target [T], got {tuple(logits_TV.shape)} and {tuple(target_T.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    pad_from = logits_TV.shape[-1] if valid_vocab_size is None else valid_vocab_size - vocab_start
    return _VocabParallelLogProbEntropy.apply(
        logits_TV,
        target_T,
        float(temperature),
        int(chunk_tokens),
        int(vocab_start),
        int(pad_from),
        tp_group,
        bool(inplace_backward),
    )


def naive_logprob_entropy(logits_TV: Tensor, target_T: Tensor, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The plain full-vocabulary computation (what upstream does); the reference for tests and benchmarks."""
    x = logits_TV.float() / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, target_T.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(x, dim=-1)
    entropy = torch.logsumexp(x, dim=-1) - (p * x).sum(-1)
    return logp, entropy
