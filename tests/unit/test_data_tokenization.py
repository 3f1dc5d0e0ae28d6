"""Chat template choice, <think>\\n bookkeeping, separate tokenization and the length policies (real Qwen tokenizer)."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luffy_megatron.data import (
    DEFAULT_CHAT_TEMPLATE,
    DataError,
    Example,
    build_prompt_text,
    encode_example,
    load_tokenized_dataset,
    resolve_chat_template,
    tokenize_examples,
)
from luffy_megatron.data.prompts import LUFFY_SYSTEM_PROMPT, make_prompt

THINK, END_THINK, IM_START, IM_END, ENDOFTEXT = 151667, 151668, 151644, 151645, 151643


def example(i=0, *, problem=None, demo=None, row_index=None):
    problem = problem or f"What is {i} + {i}?"
    demo = demo if demo is not None else f"<think>\n{i} + {i} = {2 * i}.\n</think>\nThe answer is $\\boxed{{{2 * i}}}$."
    return Example(
        prompt=make_prompt(problem),
        ground_truth=str(2 * i),
        data_source="t",
        demo=demo,
        row_index=i if row_index is None else row_index,
    )


@pytest.fixture
def think_template_file(tmp_path):
    path = tmp_path / "think.jinja"
    path.write_text(DEFAULT_CHAT_TEMPLATE)
    return path


def test_qwen3_own_template_does_not_end_with_think_so_default_is_used(qwen_tokenizer):
    own = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    assert not own.endswith("<think>\n")  # the premise: Qwen3's template stops at "<|im_start|>assistant\n"
    template = resolve_chat_template(qwen_tokenizer)
    assert template.source == "default" and template.ends_with_think
    text = build_prompt_text(make_prompt("What is 1 + 1?"), qwen_tokenizer, chat_template=template)
    assert text.endswith("<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert text.startswith(f"<|im_start|>system\n{LUFFY_SYSTEM_PROMPT}<|im_end|>\n")


def test_model_template_is_used_when_it_ends_with_think(qwen_tokenizer):
    saved = qwen_tokenizer.chat_template
    own = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[A]<think>\n{% endif %}"
    )
    try:
        qwen_tokenizer.chat_template = own
        template = resolve_chat_template(qwen_tokenizer)
        assert template.source == "model" and template.text == own
        assert build_prompt_text([{"role": "user", "content": "q"}], qwen_tokenizer) == "[user]q[A]<think>\n"
    finally:
        qwen_tokenizer.chat_template = saved


def test_template_override_from_file(qwen_tokenizer, tmp_path, think_template_file):
    template = resolve_chat_template(qwen_tokenizer, think_template_file)
    assert template.source == str(think_template_file) and template.ends_with_think
    with pytest.raises(DataError, match="chat_template file not found"):
        resolve_chat_template(qwen_tokenizer, tmp_path / "nope.jinja")


def test_remove_system_drops_the_system_message(qwen_tokenizer):
    text = build_prompt_text(make_prompt("What is 1 + 1?"), qwen_tokenizer, remove_system=True)
    assert text == "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert "system" not in text and LUFFY_SYSTEM_PROMPT not in text


def test_demo_think_stripped_and_tokenized_separately(qwen_tokenizer):
    ex = example(3)
    encoded, outcome = encode_example(ex, qwen_tokenizer)
    assert outcome == "kept"
    prompt_text = build_prompt_text(ex.prompt, qwen_tokenizer)
    demo_text = ex.demo.removeprefix("<think>\n")
    assert encoded.prompt_text == prompt_text
    assert encoded.prompt_ids == qwen_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert encoded.demo_ids == qwen_tokenizer(demo_text, add_special_tokens=False)["input_ids"]
    assert encoded.prompt_ids[-2:] == [THINK, 198]  # "...assistant\n<think>\n"
    assert encoded.demo_ids[0] != THINK and END_THINK in encoded.demo_ids
    assert encoded.demo_ids[-1] not in (ENDOFTEXT, IM_END)  # EOS is the rollout's job
    assert qwen_tokenizer.decode(encoded.prompt_ids + encoded.demo_ids) == prompt_text + demo_text
    assert encoded.ground_truth == "6" and encoded.data_source == "t" and not encoded.demo_truncated


def test_demo_keeps_think_when_the_template_does_not_end_with_it(qwen_tokenizer):
    # Qwen3's own template (forced with "model") ends with "assistant\n": nothing to strip.
    encoded, _ = encode_example(example(1), qwen_tokenizer, chat_template="model")
    assert encoded.prompt_text.endswith("<|im_start|>assistant\n")
    assert encoded.demo_ids[:2] == [THINK, 198]


def test_validation_rows_have_no_demo(qwen_tokenizer):
    ex = Example(prompt=make_prompt("q"), ground_truth="1", data_source="aime", demo=None)
    encoded, outcome = encode_example(ex, qwen_tokenizer)
    assert outcome == "kept" and encoded.demo_ids is None


def test_long_prompt_dropped_and_counted(qwen_tokenizer, caplog):
    examples = [example(i) for i in range(4)] + [example(4, problem="word " * 300)]
    with caplog.at_level(logging.WARNING):
        dataset = tokenize_examples(examples, qwen_tokenizer, max_prompt_length=250, remove_system=True)
    assert dataset.counts.as_dict() == {
        "num_rows": 5,
        "kept": 4,
        "dropped_long_prompt": 1,
        "truncated_demo": 0,
        "dropped_long_demo": 0,
        "bad_rows": 0,
    }
    assert [e.row_index for e in dataset] == [0, 1, 2, 3]
    assert all(len(e.prompt_ids) <= 250 for e in dataset)
    assert "dropped 1 of 5 rows: prompt longer than max_prompt_length=250" in caplog.text


def test_long_prompt_error_policy(qwen_tokenizer):
    examples = [example(0), example(1, problem="word " * 300), example(2, problem="word " * 400)]
    with pytest.raises(DataError, match=r"max_prompt_length=250 but 2 of 3 .*row 1 .*row 2"):
        tokenize_examples(
            examples, qwen_tokenizer, max_prompt_length=250, long_prompt_policy="error", remove_system=True
        )


def test_long_demo_truncated_or_dropped(qwen_tokenizer):
    long_demo = "<think>\n" + "step " * 100 + "</think>\n\\boxed{2}"
    examples = [example(0), example(1, demo=long_demo), example(2)]
    truncated = tokenize_examples(examples, qwen_tokenizer, max_prefix_len=30)
    assert truncated.counts.kept == 3 and truncated.counts.truncated_demo == 1
    cut = truncated[1]
    assert len(cut.demo_ids) == 30 and cut.num_demo_tokens > 30 and cut.demo_truncated
    full = qwen_tokenizer(long_demo.removeprefix("<think>\n"), add_special_tokens=False)["input_ids"]
    assert cut.demo_ids == full[:30]

    dropped = tokenize_examples(examples, qwen_tokenizer, max_prefix_len=30, long_demo_policy="drop")
    assert dropped.counts.kept == 2 and dropped.counts.dropped_long_demo == 1 and dropped.counts.truncated_demo == 0
    assert [e.row_index for e in dropped] == [0, 2]


def test_bad_options_are_errors(qwen_tokenizer):
    with pytest.raises(ValueError, match="long_prompt_policy='truncate'"):
        tokenize_examples([example(0)], qwen_tokenizer, long_prompt_policy="truncate")
    with pytest.raises(ValueError, match="long_demo_policy='keep'"):
        tokenize_examples([example(0)], qwen_tokenizer, long_demo_policy="keep")
    with pytest.raises(DataError, match="no rows left"):
        tokenize_examples([example(0, problem="word " * 300)], qwen_tokenizer, max_prompt_length=50)


def test_load_tokenized_dataset_accounts_for_every_row(qwen_tokenizer, tmp_path):
    def row(i, **override):
        ex = example(i)
        r = {
            "data_source": "",
            "prompt": ex.prompt,
            "target": [{"role": "assistant", "content": ex.demo}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ex.ground_truth},
            "extra_info": {"split": "train", "index": i},
        }
        r.update(override)
        return r

    rows = [
        row(0),
        row(1, reward_model={"style": "rule", "ground_truth": ""}),
        row(2, prompt=make_prompt("word " * 300)),
        row(3),
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match="row 1: field 'reward_model.ground_truth': empty string"):
        load_tokenized_dataset(path, qwen_tokenizer, require_target=True)
    dataset = load_tokenized_dataset(
        path, qwen_tokenizer, require_target=True, skip_bad_rows=True, max_prompt_length=250, remove_system=True
    )
    counts = dataset.counts
    assert (counts.num_rows, counts.kept, counts.bad_rows, counts.dropped_long_prompt) == (4, 2, 1, 1)
    assert counts.kept + counts.bad_rows + counts.dropped_long_prompt + counts.dropped_long_demo == counts.num_rows
    assert dataset.bad_row_report.num_bad_rows == 1 and [e.row_index for e in dataset] == [0, 3]
