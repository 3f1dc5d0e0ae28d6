"""Chat template, prompt and demonstration tokenization, and the length policies (LUFFY's
``rl_dataset_with_target.py`` L100-157).

What a row becomes:

* prompt: ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``, then tokenized with
  ``add_special_tokens=False``. The generation prompt must end with ``"<think>\\n"``: the model's own
  template is used when it does that, otherwise `DEFAULT_CHAT_TEMPLATE`.
* demonstration (``target[0].content``): a leading ``"<think>\\n"`` is stripped when the templated prompt
  ends with ``"<think>\\n"`` (the prompt already holds it), then it is tokenized **alone** with
  ``add_special_tokens=False`` -- not together with the prompt, as upstream does (BPE merges across the
  boundary could differ).
* **No EOS is appended here.** The rollout composition appends ``tokenizer.eos_token_id`` to a non-empty
  demonstration (upstream ``mix_vllm_rollout.py`` L162-165), and that EOS is trained as an off-policy token.
* teacher probabilities (``algo.use_off_policy_probs``; `Example.target_probs`): upstream requires one per
  token of the tokenized target (after the ``"<think>\\n"`` strip, before truncation) plus one for the EOS
  the rollout appends, and puts probability j on response position j. Here they become
  `EncodedExample.demo_probs`, aligned with ``demo_ids + [eos]`` -- exactly the tokens a full-trace row
  holds -- so ``demo_probs[j]`` is the teacher's probability of that row's response token j. A length that
  does not match is a DataError naming the file, the row and the column. A demonstration truncated to
  ``max_prefix_len`` keeps the probabilities of its kept tokens; the EOS appended after the cut was never
  the teacher's next token, so it gets probability 1.0 (what upstream assumes for every token without
  teacher probabilities; upstream itself stops on the length assert for such a row).
* lengths: a prompt longer than ``max_prompt_length`` tokens is dropped (``long_prompt_policy="drop"``,
  upstream's load-time filter) or is an error (``"error"``); a demonstration longer than ``max_prefix_len``
  is truncated to it (``long_demo_policy="truncate"``, upstream's silent truncation, counted here) or its row
  is dropped (``"drop"``). Every count is logged and kept on the result.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from luffy_megatron.data.errors import BadRowReport, DataError, row_error_message
from luffy_megatron.data.readers import Example, read_luffy_parquet

logger = logging.getLogger(__name__)

THINK_PREFIX = "<think>\n"

# The default template: plain ChatML whose generation prompt is "<|im_start|>assistant\n<think>\n", the
# shape of the chat template of LUFFY's Elliott/Qwen2.5-Math-7B-16k-think model (its generation prompt ends
# with "<think>\n", issues #29/#43; its exact Jinja text is not public). Unlike Qwen's stock templates it
# never injects a default system message: a row without one (final evaluation, remove_system=True) is
# rendered without one. Used when the model's own template does not end the generation prompt with
# "<think>\n" (e.g. Qwen3's, which ends it with "<|im_start|>assistant\n"), or has no template at all.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- endif %}"
)

LONG_PROMPT_POLICIES = ("drop", "error")
LONG_DEMO_POLICIES = ("truncate", "drop")


# ------------------------------------------------------------------------------------------ chat template


def _render(tokenizer: Any, messages: list[dict[str, str]], template: str) -> str:
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):  # some tokenizers return a list for a batch of one
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def generation_prompt_ends_with_think(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` ends a templated prompt with ``"<think>\\n"`` (probed on a one-message chat)."""
    probe = [{"role": "user", "content": "1+1=?"}]
    return _render(tokenizer, probe, template).endswith(THINK_PREFIX)


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved chat template: its Jinja text, where it came from, and whether its prompt ends in
    ``"<think>\\n"`` (which decides whether demonstrations lose their leading ``"<think>\\n"``)."""

    text: str
    source: str  # "model", "default" or the path of a .jinja file
    ends_with_think: bool


def resolve_chat_template(tokenizer: Any, chat_template: str | Path | None = None) -> ChatTemplate:
    """Choose the chat template.

    ``chat_template``: None -> the model's own template if its generation prompt ends with ``"<think>\\n"``,
    else `DEFAULT_CHAT_TEMPLATE`; ``"default"`` -> `DEFAULT_CHAT_TEMPLATE`; ``"model"`` -> the model's own
    template whatever it does; anything else -> a path to a ``.jinja`` file. An explicit choice whose
    generation prompt does not end with ``"<think>\\n"`` is allowed (e.g. a baseline without thinking) but
    logged as a warning, since then demonstrations keep their ``"<think>\\n"``.
    """
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            try:
                if generation_prompt_ends_with_think(tokenizer, own):
                    logger.info("chat template: the model's own (its generation prompt ends with <think>\\n)")
                    return ChatTemplate(own, "model", True)
            except Exception as exc:  # noqa: BLE001 - any template that cannot render a [user] chat is unusable
                logger.warning("the model's chat template fails on a [user] chat (%s); using the default", exc)
            reason = "does not end its generation prompt with <think>\\n"
        else:
            reason = "is missing"
        logger.info("chat template: the default ChatML + <think>\\n template (the model's own %s)", reason)
        return ChatTemplate(DEFAULT_CHAT_TEMPLATE, "default", True)

    if str(chat_template) == "default":
        text, source = DEFAULT_CHAT_TEMPLATE, "default"
    elif str(chat_template) == "model":
        text, source = getattr(tokenizer, "chat_template", None), "model"
        if not isinstance(text, str) or not text:
            raise DataError("chat_template='model' but the tokenizer has no chat template")
    else:
        path = Path(chat_template)
        if not path.is_file():
            raise DataError(f"chat_template file not found: {path}")
        text, source = path.read_text(encoding="utf-8"), str(path)
        if not text.strip():
            raise DataError(f"chat_template file is empty: {path}")
    try:
        ends_with_think = generation_prompt_ends_with_think(tokenizer, text)
    except Exception as exc:
        raise DataError(f"chat template from {source} cannot render a [user] chat: {exc}") from exc
    if not ends_with_think:
        logger.warning(
            "chat template from %s: the generation prompt does not end with <think>\\n; demonstrations keep "
            "their leading <think>\\n and LUFFY's reward (which prepends <think>\\n) may not fit",
            source,
        )
    return ChatTemplate(text, source, ends_with_think)


def _as_template(tokenizer: Any, chat_template: ChatTemplate | str | Path | None) -> ChatTemplate:
    return chat_template if isinstance(chat_template, ChatTemplate) else resolve_chat_template(tokenizer, chat_template)


def build_prompt_text(
    messages: list[dict[str, str]],
    tokenizer: Any,
    remove_system: bool = False,
    chat_template: ChatTemplate | str | Path | None = None,
) -> str:
    """The templated prompt text, ending with the generation prompt (``...assistant\\n<think>\\n``).

    ``remove_system=True`` drops system messages first (LUFFY's final evaluation, ``--remove_system True``).
    Pass a `ChatTemplate` from `resolve_chat_template` when calling this in a loop.
    """
    template = _as_template(tokenizer, chat_template)
    if remove_system:
        messages = [m for m in messages if m["role"] != "system"]
    if not messages:
        raise DataError("no messages left to template (remove_system dropped the only message)")
    return _render(tokenizer, messages, template.text)


def strip_think_prefix(demo: str, prompt_text: str) -> str:
    """Drop the demonstration's leading ``"<think>\\n"`` when the prompt already ends with it (upstream L129-130)."""
    if prompt_text.endswith(THINK_PREFIX) and demo.startswith(THINK_PREFIX):
        return demo[len(THINK_PREFIX) :]
    return demo


# ------------------------------------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized row, ready for rollout composition.

    ``prompt_ids``: the templated prompt (no padding, no BOS added). ``demo_ids``: the demonstration without
    its leading ``"<think>\\n"`` and without EOS (appended by the rollout), at most ``max_prefix_len`` long;
    None for rows without a demonstration (validation). ``num_demo_tokens`` is its length before truncation.
    ``demo_probs`` (when the row has teacher probabilities): ``demo_probs[j]`` is the teacher's probability of
    ``(demo_ids + [eos])[j]``, i.e. of response token j of the row that carries this demonstration.
    """

    prompt_ids: list[int]
    demo_ids: list[int] | None
    ground_truth: str
    data_source: str
    prompt_text: str
    row_index: int = -1
    num_demo_tokens: int = 0
    # teacher probabilities aligned with demo_ids + [eos] (len(demo_ids) + 1 float32 values), or None
    demo_probs: Any = field(default=None, compare=False, repr=False)

    @property
    def demo_truncated(self) -> bool:
        return self.demo_ids is not None and len(self.demo_ids) < self.num_demo_tokens


# Outcome of encoding one row under the length limits (also the names of the counters).
KEPT, TRUNCATED_DEMO, DROPPED_LONG_PROMPT, DROPPED_LONG_DEMO = (
    "kept",
    "truncated_demo",
    "dropped_long_prompt",
    "dropped_long_demo",
)


def _check_options(max_prompt_length: int, max_prefix_len: int, long_prompt_policy: str, long_demo_policy: str) -> None:
    if long_prompt_policy not in LONG_PROMPT_POLICIES:
        raise ValueError(f"long_prompt_policy={long_prompt_policy!r}: expected one of {LONG_PROMPT_POLICIES}")
    if long_demo_policy not in LONG_DEMO_POLICIES:
        raise ValueError(f"long_demo_policy={long_demo_policy!r}: expected one of {LONG_DEMO_POLICIES}")
    if max_prompt_length <= 0 or max_prefix_len <= 0:
        raise ValueError(f"max_prompt_length={max_prompt_length} and max_prefix_len={max_prefix_len} must be > 0")


def align_demo_probs(probs: Any, num_demo_tokens: int, kept: int, *, where: str, row_index: int, key: str) -> Any:
    """The teacher probabilities of one demonstration aligned with ``demo_ids + [eos]`` (see the module doc).

    ``probs`` as stored: one per target token plus one for EOS (``num_demo_tokens + 1``); ``kept``: the
    number of demonstration tokens kept (``max_prefix_len`` when truncated). DataError when the length differs."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape != (num_demo_tokens + 1,):
        raise DataError(
            row_error_message(
                where,
                row_index,
                key,
                f"{probs.size} teacher probabilities, but the target tokenizes to {num_demo_tokens} tokens (after "
                f"stripping a leading <think>\\n when the prompt ends with it), so {num_demo_tokens + 1} are expected "
                f"(one per token, then one for EOS, as upstream); were they computed with this model's tokenizer "
                f"and chat template?",
            )
        )
    if kept == num_demo_tokens:
        return probs
    return np.concatenate([probs[:kept], np.ones(1, dtype=np.float32)])  # the EOS after the cut: 1.0


def _encode_batch(
    examples: Sequence[Example],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    max_prompt_length: int,
    max_prefix_len: int,
    long_demo_policy: str,
    remove_system: bool,
    source: str = "",
    target_probs_key: str = "target_probs",
) -> list[tuple[EncodedExample | None, str, int]]:
    """(encoded or None, outcome, prompt length) per example; prompts and demos are tokenized in two batches."""
    prompt_texts = [build_prompt_text(ex.prompt, tokenizer, remove_system, template) for ex in examples]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    demo_texts = [
        None if ex.demo is None else strip_think_prefix(ex.demo, text) for ex, text in zip(examples, prompt_texts)
    ]
    present = [i for i, d in enumerate(demo_texts) if d is not None]
    demo_ids: list[list[int] | None] = [None] * len(examples)
    if present:
        encoded = tokenizer([demo_texts[i] for i in present], add_special_tokens=False)["input_ids"]
        for i, ids in zip(present, encoded):
            demo_ids[i] = list(ids)

    results = []
    for ex, text, p_ids, d_ids in zip(examples, prompt_texts, prompt_ids, demo_ids):
        if len(p_ids) > max_prompt_length:
            results.append((None, DROPPED_LONG_PROMPT, len(p_ids)))
            continue
        outcome = KEPT
        num_demo_tokens = 0 if d_ids is None else len(d_ids)
        if d_ids is not None and len(d_ids) > max_prefix_len:
            if long_demo_policy == "drop":
                results.append((None, DROPPED_LONG_DEMO, len(p_ids)))
                continue
            d_ids, outcome = d_ids[:max_prefix_len], TRUNCATED_DEMO
        demo_probs = None
        if d_ids is not None and ex.target_probs is not None:
            demo_probs = align_demo_probs(
                ex.target_probs,
                num_demo_tokens,
                len(d_ids),
                where=source or "<rows>",
                row_index=ex.row_index,
                key=target_probs_key,
            )
        encoded_example = EncodedExample(
            prompt_ids=list(p_ids),
            demo_ids=d_ids,
            ground_truth=ex.ground_truth,
            data_source=ex.data_source,
            prompt_text=text,
            row_index=ex.row_index,
            num_demo_tokens=num_demo_tokens,
            demo_probs=demo_probs,
        )
        results.append((encoded_example, outcome, len(p_ids)))
    return results


def encode_example(
    example: Example,
    tokenizer: Any,
    *,
    chat_template: ChatTemplate | str | Path | None = None,
    max_prompt_length: int = 1024,
    max_prefix_len: int = 8192,
    long_demo_policy: str = "truncate",
    remove_system: bool = False,
) -> tuple[EncodedExample | None, str]:
    """Encode one row: ``(EncodedExample, "kept" | "truncated_demo")`` or ``(None, "dropped_long_prompt" |
    "dropped_long_demo")``. Whether a long prompt is an error is decided over a whole file by
    `tokenize_examples` (so the error can say how many there are)."""
    _check_options(max_prompt_length, max_prefix_len, "drop", long_demo_policy)
    encoded, outcome, _ = _encode_batch(
        [example],
        tokenizer,
        _as_template(tokenizer, chat_template),
        max_prompt_length=max_prompt_length,
        max_prefix_len=max_prefix_len,
        long_demo_policy=long_demo_policy,
        remove_system=remove_system,
    )[0]
    return encoded, outcome


@dataclass
class TokenizeCounts:
    """What happened to the rows of one file. ``num_rows`` = rows in the file; every row is in exactly one of
    ``kept``, ``dropped_long_prompt``, ``dropped_long_demo``, ``bad_rows``; ``truncated_demo`` counts kept
    rows whose demonstration was cut to ``max_prefix_len``."""

    num_rows: int = 0
    kept: int = 0
    dropped_long_prompt: int = 0
    truncated_demo: int = 0
    dropped_long_demo: int = 0
    bad_rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class TokenizedDataset:
    """The kept rows of one file, tokenized, with the counts of what was dropped or cut and why."""

    examples: list[EncodedExample]
    counts: TokenizeCounts
    chat_template: ChatTemplate
    source: str = ""
    max_prompt_length: int = 1024
    max_prefix_len: int = 8192
    bad_row_report: BadRowReport | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]

    def __iter__(self) -> Iterator[EncodedExample]:
        return iter(self.examples)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    chat_template: ChatTemplate | str | Path | None = None,
    max_prompt_length: int = 1024,
    max_prefix_len: int = 8192,
    long_prompt_policy: str = "drop",
    long_demo_policy: str = "truncate",
    remove_system: bool = False,
    bad_rows: int = 0,
    source: str = "",
    batch_size: int = 256,
    progress: bool = False,
    target_probs_key: str = "target_probs",
) -> TokenizedDataset:
    """Tokenize validated rows and apply the length policies; counts are logged and returned.

    ``bad_rows`` is the number of rows the reader already skipped (it goes into the counts).
    Rows with teacher probabilities (`Example.target_probs`) get `EncodedExample.demo_probs`; a length that
    does not fit the tokenized target is a DataError naming ``source``, the row and ``target_probs_key``.
    ``long_prompt_policy="error"`` raises a DataError that says how many prompts are too long.
    ``progress=True`` shows a progress bar (46k rows with 8k-token demonstrations take a while).
    """
    _check_options(max_prompt_length, max_prefix_len, long_prompt_policy, long_demo_policy)
    template = _as_template(tokenizer, chat_template)
    counts = TokenizeCounts(num_rows=len(examples) + bad_rows, bad_rows=bad_rows)
    kept: list[EncodedExample] = []
    long_prompts: list[tuple[int, int]] = []  # (row index, length)
    bar = tqdm(total=len(examples), desc=f"tokenizing {source or 'rows'}", unit="row", disable=not progress)
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        results = _encode_batch(
            batch,
            tokenizer,
            template,
            max_prompt_length=max_prompt_length,
            max_prefix_len=max_prefix_len,
            long_demo_policy=long_demo_policy,
            remove_system=remove_system,
            source=source,
            target_probs_key=target_probs_key,
        )
        for ex, (encoded, outcome, prompt_len) in zip(batch, results):
            if outcome == DROPPED_LONG_PROMPT:
                counts.dropped_long_prompt += 1
                long_prompts.append((ex.row_index, prompt_len))
            elif outcome == DROPPED_LONG_DEMO:
                counts.dropped_long_demo += 1
            else:
                counts.kept += 1
                counts.truncated_demo += outcome == TRUNCATED_DEMO
                kept.append(encoded)
        bar.update(len(batch))
    bar.close()

    where = f"{source}: " if source else ""
    _report_length_filters(
        counts,
        long_prompts,
        where=where,
        num_examples=len(examples),
        long_prompt_policy=long_prompt_policy,
        max_prompt_length=max_prompt_length,
        max_prefix_len=max_prefix_len,
    )
    if not kept:
        raise DataError(f"{where}no rows left after the length filters: {counts.as_dict()}")
    return TokenizedDataset(
        examples=kept,
        counts=counts,
        chat_template=template,
        source=source,
        max_prompt_length=max_prompt_length,
        max_prefix_len=max_prefix_len,
    )


def _report_length_filters(
    counts: TokenizeCounts,
    long_prompts: list[tuple[int, int]],
    *,
    where: str,
    num_examples: int,
    long_prompt_policy: str,
    max_prompt_length: int,
    max_prefix_len: int,
) -> None:
    """Logs what the length policies did; a DataError for too-long prompts under long_prompt_policy=error.
    `long_prompts`: (row index, templated prompt length) of the prompts over max_prompt_length."""
    if long_prompts and long_prompt_policy == "error":
        rows = ", ".join(f"row {i} ({n} tokens)" for i, n in long_prompts[:5])
        raise DataError(
            f"{where}max_prompt_length={max_prompt_length} but {len(long_prompts)} of {num_examples} templated "
            f"prompts are longer (first: {rows}); raise max_prompt_length or set long_prompt_policy=drop"
        )
    if counts.dropped_long_prompt:
        logger.warning(
            "%sdropped %d of %d rows: prompt longer than max_prompt_length=%d tokens",
            where,
            counts.dropped_long_prompt,
            counts.num_rows,
            max_prompt_length,
        )
    if counts.truncated_demo:
        logger.warning(
            "%struncated %d demonstrations to max_prefix_len=%d tokens", where, counts.truncated_demo, max_prefix_len
        )
    if counts.dropped_long_demo:
        logger.warning(
            "%sdropped %d rows: demonstration longer than max_prefix_len=%d tokens",
            where,
            counts.dropped_long_demo,
            max_prefix_len,
        )
    logger.info("%s%s", where, counts.as_dict())


def load_tokenized_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    require_target: bool,
    skip_bad_rows: bool = False,
    target_probs_key: str | None = None,
    require_target_probs: bool = False,
    **tokenize_kwargs: Any,
) -> TokenizedDataset:
    """Read a LUFFY parquet file and tokenize it: `read_luffy_parquet` + `tokenize_examples`.
    ``target_probs_key`` / ``require_target_probs``: the teacher probabilities (see `read_luffy_parquet`)."""
    examples, report = read_luffy_parquet(
        path,
        require_target=require_target,
        skip_bad_rows=skip_bad_rows,
        target_probs_key=target_probs_key,
        require_target_probs=require_target_probs,
    )
    dataset = tokenize_examples(
        examples,
        tokenizer,
        bad_rows=report.num_bad_rows,
        source=str(path),
        target_probs_key=target_probs_key or "target_probs",
        **tokenize_kwargs,
    )
    dataset.bad_row_report = report
    return dataset
