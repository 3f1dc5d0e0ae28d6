"""The size of the weight sync's slots (`convert.export.sync_slot_bytes`, `largest_export_bytes`,
`sync_buffer_bytes`): the largest bucket of the real plan, which is the largest unsplit parameter (the
embedding) whenever that is larger than the bucket size, and the memory plan's term from sizes alone agrees
with the plan of a real (tiny) model."""

from __future__ import annotations

import pytest
import torch

from luffy_megatron.convert.export import (
    ALIGN,
    SYNC_SLOTS,
    largest_export_bytes,
    plan_flat_buckets,
    sync_buffer_bytes,
    sync_slot_bytes,
)
from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch
from luffy_megatron.models.parallel import init_model_parallel
from tests.dist.tiny_models import make_tiny_model

QWEN25 = dict(  # the shapes of Qwen2.5's config.json files that decide the largest tensor
    model_type="qwen2", vocab_size=152064, num_hidden_layers=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_dir = make_tiny_model("qwen2", tmp_path_factory.mktemp("slot") / "hf")  # vocab 600, hidden 64, ffn 128
    init_model_parallel(1, 1)
    arch = read_hf_arch(hf_dir)
    return arch, build_model_chunks(arch, use_te=False)


@pytest.mark.parametrize("bucket_bytes", [1024, 16 * 1024, 1 << 20])
def test_the_slot_is_the_largest_bucket_and_the_plan_term_bounds_it(tiny, bucket_bytes):
    arch, chunks = tiny
    buckets = plan_flat_buckets(chunks, arch, bucket_bytes=bucket_bytes, dtype=torch.bfloat16, all_stages=False)
    slot = sync_slot_bytes(buckets)
    assert slot == max(b.nbytes for b in buckets)
    largest = largest_export_bytes(arch, itemsize=2)
    assert largest == 600 * 64 * 2  # the embedding (lm_head: the same), larger than gate+up (2 x 128 x 64 x 2)
    if bucket_bytes < largest:  # the embedding is a bucket of its own, larger than the bucket size
        assert slot == largest > bucket_bytes
    most_entries = max(len(b.entries) for b in buckets)
    assert slot <= sync_buffer_bytes(bucket_bytes, largest) // SYNC_SLOTS + ALIGN * most_entries
    assert sync_buffer_bytes(bucket_bytes, largest) == 2 * max(bucket_bytes, largest)


@pytest.mark.parametrize(
    "hidden, ffn, heads, kv, gib",
    [(3584, 18944, 28, 4, 1.015), (5120, 13824, 40, 8, 1.450), (5120, 27648, 40, 8, 1.450)],  # 7B, 14B, 32B
)
def test_qwen25_slots_are_the_embedding_not_the_bucket_size(hidden, ffn, heads, kv, gib):
    arch = read_hf_arch(
        dict(QWEN25, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv)
    )
    largest = largest_export_bytes(arch, itemsize=2)
    assert largest == 152064 * hidden * 2 and round(largest / 2**30, 3) == gib
    assert sync_buffer_bytes(512 * 2**20, largest) == 2 * largest  # not the 2 x 512 MiB the plan counted
