"""Datasets: LUFFY parquet and raw benchmark readers, the chat template, tokenization with length
policies, and the demo training data (synthetic arithmetic, MATH with human solutions).

    examples, report = read_luffy_parquet(path, require_target=True)        # validated rows
    dataset = tokenize_examples(examples, tokenizer, max_prompt_length=1024, max_prefix_len=8192)
    dataset = load_tokenized_dataset(path, tokenizer, require_target=True)  # both at once
    items = read_benchmark("aime24")                                        # [{data_source, problem, answer, index}]
"""

from luffy_megatron.data.answers import last_boxed, normalize_answer, normalize_problem, strip_dollars
from luffy_megatron.data.errors import BadRowReport, DataError
from luffy_megatron.data.prompts import LUFFY_SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT, make_prompt
from luffy_megatron.data.readers import (
    BENCHMARKS,
    BenchmarkSpec,
    Example,
    default_eval_root,
    load_benchmark,
    read_benchmark,
    read_luffy_parquet,
    shared_dir,
)
from luffy_megatron.data.tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    THINK_PREFIX,
    ChatTemplate,
    EncodedExample,
    TokenizeCounts,
    TokenizedDataset,
    build_prompt_text,
    encode_example,
    load_tokenized_dataset,
    resolve_chat_template,
    tokenize_examples,
)
from luffy_megatron.data.writers import write_luffy_parquet

__all__ = [
    "BENCHMARKS",
    "BadRowReport",
    "BenchmarkSpec",
    "ChatTemplate",
    "DEFAULT_CHAT_TEMPLATE",
    "DataError",
    "EncodedExample",
    "Example",
    "LUFFY_SYSTEM_PROMPT",
    "SHORT_SYSTEM_PROMPT",
    "THINK_PREFIX",
    "TokenizeCounts",
    "TokenizedDataset",
    "build_prompt_text",
    "default_eval_root",
    "encode_example",
    "last_boxed",
    "load_benchmark",
    "load_tokenized_dataset",
    "make_prompt",
    "normalize_answer",
    "normalize_problem",
    "read_benchmark",
    "read_luffy_parquet",
    "resolve_chat_template",
    "shared_dir",
    "strip_dollars",
    "tokenize_examples",
    "write_luffy_parquet",
]
