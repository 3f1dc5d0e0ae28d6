"""The miniature's task, data, tokenizer and base architecture (tools/experiment.py).

The premise of the paper in small: the base model knows the atomic facts (every two-operand sum and difference
of a number up to 35 and an operand up to 5, "pretrained" in-house through the stack's SFT mode) and answers
directly;
the demonstrations carry a procedure it lacks, the rewrite chain of multi-operand sums
(`data.synthetic.rewrite_chain`), built from facts it knows. 5% of its pretraining answers use a one-line
rewrite (`a + b` / `= c`), so the procedure's first tokens are likely enough to matter and rare enough that
on-policy sampling seldom completes a chain.

Splits (disjoint problems, operands 0-5, every running value in [0, 35]):
  train         3-5 operands, "+" (one demonstration each)
  id            unseen problems of the training kind
  ood_length    6-7 operands, "+"
  ood_operator  3-5 operands, "+" and "-" (at least one "-"), running value never below 0
  retention     two operands, "+" and "-": the base's own skill, which no arm trains
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from luffy_megatron.data import write_luffy_parquet
from luffy_megatron.data.synthetic import ArithmeticProblem, evaluate, luffy_row, rewrite_chain
from luffy_megatron.utils.fs import atomic_dir

SPLITS = ("id", "ood_length", "ood_operator", "retention")
SPLIT_LABELS = {
    "id": "ID (3-5 operands, +)",
    "ood_length": "OOD-length (6-7 operands)",
    "ood_operator": "OOD-operator (+ and -)",
    "retention": "retention (2 operands)",
}
ARM_LABELS = {
    "on_policy": "On-policy GRPO",
    "luffy": "LUFFY (p/(p+0.1))",
    "luffy_no_reshape": "LUFFY, no shaping",
    "sft": "SFT",
    "luffy_one_step": "LUFFY one-step-off (token_tis)",
}
OPERAND_MAX = 5  # operands 0..5
MAX_VALUE = 35  # the largest running value (7 operands of 5)
REWRITE_SHARE = 0.05  # of the base's pretraining answers
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_CLOSE = "</think>"
_EXPRESSION = re.compile(r"^\d+( [+-] \d+)+$")


# ------------------------------------------------------------------------------------------ problems


def _running_values(problem: ArithmeticProblem) -> list[int]:
    values = [problem.operands[0]]
    for op, b in zip(problem.ops, problem.operands[1:]):
        values.append(values[-1] + b if op == "+" else values[-1] - b)
    return values


def sample_chain(rng: random.Random, operands: tuple[int, int], ops: tuple[str, ...]) -> ArithmeticProblem:
    """One problem of `operands[0]..operands[1]` operands in 0..OPERAND_MAX; with "-" among `ops`, at least one "-" and
    a running value that never goes below 0."""
    while True:
        n = rng.randint(*operands)
        problem = ArithmeticProblem(
            tuple(rng.randint(0, OPERAND_MAX) for _ in range(n)), tuple(rng.choice(ops) for _ in range(n - 1))
        )
        values = _running_values(problem)
        if min(values) >= 0 and max(values) <= MAX_VALUE and ("-" not in ops or "-" in problem.ops):
            return problem


def sample_fact(rng: random.Random) -> ArithmeticProblem:
    """A two-operand problem inside the base's facts: a + b (a <= 30) or a - b (a >= b), b <= OPERAND_MAX."""
    b = rng.randint(0, OPERAND_MAX)
    if rng.random() < 0.5:
        return ArithmeticProblem((rng.randint(0, MAX_VALUE - OPERAND_MAX), b), ("+",))
    return ArithmeticProblem((rng.randint(b, MAX_VALUE), b), ("-",))


def all_facts() -> list[ArithmeticProblem]:
    """Every two-operand fact of the base's pretraining: a + b for a in [0, 30] and a - b for a in [b, 35],
    b in [0, 5] (387 facts)."""
    plus = [
        ArithmeticProblem((a, b), ("+",)) for a in range(MAX_VALUE - OPERAND_MAX + 1) for b in range(OPERAND_MAX + 1)
    ]
    minus = [ArithmeticProblem((a, b), ("-",)) for a in range(MAX_VALUE + 1) for b in range(OPERAND_MAX + 1) if a >= b]
    return plus + minus


def distinct(n: int, sample, rng: random.Random, seen: set[str]) -> list[ArithmeticProblem]:
    out = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        problem = sample(rng)
        if problem.text() not in seen:
            seen.add(problem.text())
            out.append(problem)
    raise ValueError(f"found only {len(out)} distinct problems of the {n} asked for")


def direct_answer(problem: ArithmeticProblem) -> str:
    return f"{THINK_CLOSE}\n\\boxed{{{evaluate(problem.operands, problem.ops)}}}"


def build_data(data_dir: Path, *, num_train: int, num_eval: int, fact_copies: int, seed: int = 0) -> dict[str, Path]:
    """train.parquet (rewrite-chain demonstrations), facts.parquet (the base's pretraining: every fact
    `fact_copies` times, each copy answered directly or, with probability REWRITE_SHARE, by the one-line
    rewrite) and one parquet per held-out split (retention: num_eval // 2 problems). Written once."""
    paths = {name: data_dir / f"{name}.parquet" for name in ("train", "facts", *SPLITS)}
    if all(p.exists() for p in paths.values()):
        return paths
    rng, seen = random.Random(seed), set()
    plus = ("+",)
    problems = {
        "id": distinct(num_eval, lambda r: sample_chain(r, (3, 5), plus), rng, seen),
        "ood_length": distinct(num_eval, lambda r: sample_chain(r, (6, 7), plus), rng, seen),
        "ood_operator": distinct(num_eval, lambda r: sample_chain(r, (3, 5), ("+", "-")), rng, seen),
        "retention": distinct(num_eval // 2, sample_fact, rng, seen),
        "train": distinct(num_train, lambda r: sample_chain(r, (3, 5), plus), rng, seen),
    }

    def row(problem, i, split, target=None):
        r = luffy_row(problem, i, split=split, with_target=False, system_prompt="", data_source=split)
        if target is not None:
            r["target"] = [{"role": "assistant", "content": target}]
        return r

    write_luffy_parquet([row(p, i, "train", rewrite_chain(p)) for i, p in enumerate(problems["train"])], paths["train"])
    for split in SPLITS:
        write_luffy_parquet([row(p, i, split) for i, p in enumerate(problems[split])], paths[split])
    facts = [p for p in all_facts() for _ in range(fact_copies)]
    rng.shuffle(facts)
    write_luffy_parquet(
        [
            row(p, i, "facts", rewrite_chain(p) if rng.random() < REWRITE_SHARE else direct_answer(p))
            for i, p in enumerate(facts)
        ],
        paths["facts"],
    )
    return paths


# ------------------------------------------------------------------------------- reading a response


def reasoning(response: str) -> str:
    """The text before the first </think> (the response starts inside <think>)."""
    return response.partition(THINK_CLOSE)[0]


def starts_rewrite(response: str) -> bool:
    """The response opens with the expression (the rewrite's first line), not with </think>."""
    lines = reasoning(response).strip().splitlines()
    return bool(lines) and bool(_EXPRESSION.match(lines[0].strip()))


def chain_steps(response: str) -> int:
    """The `= ...` lines of a rewrite chain before </think> (0 if it does not start a rewrite)."""
    if not starts_rewrite(response):
        return 0
    return sum(1 for line in reasoning(response).splitlines() if line.startswith("= "))


def uses_procedure(response: str, problem: str) -> bool:
    """The demonstrated procedure: a rewrite of the problem's own expression with one line per operation."""
    match = re.search(r"\$(.*)\$", problem)
    if not match or not starts_rewrite(response):
        return False
    expression = match.group(1).strip()
    lines = reasoning(response).strip().splitlines()
    return lines[0].strip() == expression and chain_steps(response) >= expression.count(" ") // 2


# ------------------------------------------------------------------------------ tokenizer and model


def build_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer of at most `vocab_size` tokens trained on the task's text: numbers are split
    from the text around them (with the space before them), so each number of the corpus is one token;
    <|im_start|>/<|im_end|> special, <|im_end|> the EOS, as SmolLM2's; no chat template of its own, so the
    trainer and luffy-eval use the default ChatML + <think> template. A few hundred tokens keep the LM head as
    cheap as the transformer (a 49k vocabulary made a step ~13x slower)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # lazy: only when building
    from transformers import PreTrainedTokenizerFast  # lazy: heavy, only when building

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # " 15" is one pre-token, merged into one token
        [
            pre_tokenizers.Split(Regex(r" ?[0-9]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def corpus_of(paths: dict[str, Path]) -> list[str]:
    """The tokenizer's training text: every prompt and demonstration and the chat template's words."""
    import pandas as pd  # lazy: only when building

    texts = ["<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n<think>\n", "system\n"]
    for name, path in paths.items():
        df = pd.read_parquet(path)
        texts += [m["content"] for prompt in df["prompt"] for m in prompt]
        if "target" in df:
            texts += [t[0]["content"] for t in df["target"] if t is not None]
    return texts


def build_random_model(out_dir: Path, corpus: list[str], *, hidden: int, layers: int, seed: int = 0) -> Path:
    """A randomly initialised Llama (heads of 32, SwiGLU FFN 512, tied embeddings; ~1.8M parameters at hidden
    192 and 4 layers) with the task tokenizer, as an HF directory."""
    import torch  # lazy: only when building
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: only when building

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = build_tokenizer(corpus)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
