"""Checks run on every rank under torchrun (gloo): layouts x tiny models.

    torchrun --nproc_per_node=2 tests/dist/convert_checks.py WORKDIR 1x1,2x1,1x2,1x2x2 [--stream] [--models=a,b]

WORKDIR holds hf/<model>/ (HF dirs) and ckpt/<model>/ (written by the single-process converter for
some other target layout). For each layout TPxPP[xVPP] and model it checks, on every rank:
  ckpt_export    converter checkpoint -> load under this layout -> streamed export == HF, bit-exact
  hf_export      HF weights loaded straight into the shards -> export == HF
  logits         (PP=1) megatron logits vs transformers', fp32, max abs diff < 1e-4
  saved_reload   a checkpoint *saved by the previous layout* (distributed save) loads here, export == HF
and saves WORKDIR/saved/<model>-<layout>. With --stream: bucketed export memory check, and the CUDA IPC sync's
export with `own_shards` (each rank's own TP shards of the tensors vLLM splits) against the full one.
Rank 0 prints one JSON line: {"checks": [...], "failures": [...], "stream": {...}}.
"""

import gc
import json
import os
import sys
import time
import traceback
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

STALE = 0xAB  # what a bucket buffer holds before the export writes into it


def own_shards_check(chunks, arch, hf, bucket_bytes):
    """The CUDA IPC sync's export (every stage's buckets on every rank) with and without `own_shards`, each
    bucket into a new buffer of STALE bytes. Without it every tensor is the HF one; with it, every tensor vLLM
    splits (`engine_tp_slice`) holds this TP rank's part of the HF tensor and STALE elsewhere, every other tensor
    is whole. Returns this rank's exchange counters of both exports and the byte sizes to compare them with."""
    from megatron.core import parallel_state as ps

    from luffy_megatron.convert.export import ExportStats, engine_tp_slice, export_flat_buckets, plan_flat_buckets

    tp, me = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    buckets = plan_flat_buckets(chunks, arch, bucket_bytes=bucket_bytes, all_stages=True)
    got, stats = {}, {}
    for mode in (False, True):
        stats[mode], got[mode] = ExportStats(), {}
        for bucket, buf in export_flat_buckets(
                buckets, arch, lambda b: torch.full((b.nbytes,), STALE, dtype=torch.uint8), everywhere=True,
                stats=stats[mode], own_shards=mode):
            got[mode].update({e.name: e.view(buf).clone() for e in bucket.entries})
    full, own = got[False], got[True]
    if set(full) != set(hf) or set(own) != set(hf) or not all(torch.equal(full[n], hf[n]) for n in hf):
        raise AssertionError("the full export differs from the HF state dict")
    split_bytes = own_part_bytes = 0
    for name, want in hf.items():
        region = engine_tp_slice(name, arch, tp, me)
        if region is None:
            if not torch.equal(own[name], want):
                raise AssertionError(f"{name}: not whole with own_shards")
            continue
        split_bytes += want.numel() * want.element_size()
        own_part_bytes += want.narrow(*region).numel() * want.element_size()
        if not torch.equal(own[name].narrow(*region), want.narrow(*region)):
            raise AssertionError(f"{name}: TP rank {me}'s part {region} differs")
        elsewhere = torch.ones(want.shape, dtype=torch.bool)
        elsewhere.narrow(*region).fill_(False)
        if not bool((own[name][elsewhere].view(torch.uint8) == STALE).all()):
            raise AssertionError(f"{name}: written outside TP rank {me}'s part {region}")
    vocab = [n for n in hf if n in ("model.embed_tokens.weight", "lm_head.weight")]
    return dict(
        tp=tp, split_bytes=split_bytes, own_part_bytes=own_part_bytes,
        vocab_bytes=sum(hf[n].numel() * hf[n].element_size() for n in vocab),
        **{f"{k}_{'own' if mode else 'full'}": getattr(stats[mode], k)
           for mode in (False, True) for k in ("tp_recv_bytes", "tp_send_bytes", "pp_broadcast_bytes")})


def main() -> int:
    workdir = Path(sys.argv[1])
    layouts = [tuple(int(x) for x in lay.split("x")) for lay in sys.argv[2].split(",")]
    do_stream = "--stream" in sys.argv
    torch.manual_seed(0)
    from luffy_megatron.models.parallel import ensure_process_group

    ensure_process_group()  # NCCL on the LOCAL_RANK GPU under CUDA, gloo on CPU
    from luffy_megatron.convert.checkpoint import load_checkpoint, save_checkpoint
    from luffy_megatron.convert.export import ExportStats, iter_hf_weight_buckets, iter_hf_weights
    from luffy_megatron.convert.hf_io import HFWeightReader
    from luffy_megatron.convert.weights import load_hf_weights
    from luffy_megatron.models.hf_to_mcore import build_model_chunks, read_hf_arch
    from luffy_megatron.models.parallel import init_model_parallel, shutdown_distributed
    from megatron.core import parallel_state as ps

    models = sorted(p.name for p in (workdir / "hf").iterdir())
    for arg in sys.argv[3:]:
        if arg.startswith("--models="):
            models = arg.split("=", 1)[1].split(",")
    hf_state = {}
    for m in models:
        r = HFWeightReader(workdir / "hf" / m)
        hf_state[m] = {n: r.get(n) for n in r.names()}
    checks, failures = [], []
    timings = {}

    def check(tag, fn):
        t = time.time()
        try:
            detail = fn()
            checks.append(tag)
            return detail
        except Exception as e:  # noqa: BLE001 - collected and reported by rank 0
            failures.append(f"{tag}: {type(e).__name__}: {e} | {traceback.format_exc()[-800:]}")
        finally:
            timings[tag] = round(time.time() - t, 2)

    def same_as_hf(chunks, arch, m):
        got = {n: t.cpu() for n, t in iter_hf_weights(chunks, arch, bucket_bytes=32 * 1024)}
        want = hf_state[m]
        if set(got) != set(want):
            raise AssertionError(f"names differ: extra {sorted(set(got) - set(want))[:5]} "
                                 f"missing {sorted(set(want) - set(got))[:5]}")
        bad = [n for n in want if got[n].dtype != want[n].dtype or not torch.equal(got[n], want[n])]
        if bad:
            raise AssertionError(f"tensors differ: {bad[:5]}")

    def logits_parity(chunks, arch, m):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(workdir / "hf" / m, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, arch.vocab_size, (2, 24), generator=g)
        pos = torch.arange(24).unsqueeze(0).expand(2, -1)
        with torch.no_grad():
            ref = hf(ids).logits
            dev = next(chunks[0].parameters()).device
            out = chunks[0](input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=None)
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            out = torch.cat(parts, dim=-1)
        diff = (out[..., : arch.vocab_size].cpu() - ref).abs().max().item()
        if not diff < 1e-4:
            raise AssertionError(f"max abs logits diff {diff}")
        return diff

    prev_layout = None
    max_diffs = {}
    for layout in layouts:
        tp, pp = layout[0], layout[1]
        vpp = layout[2] if len(layout) > 2 else None
        lay = "x".join(map(str, layout))
        init_model_parallel(tp, pp, vpp)
        for m in models:
            arch = read_hf_arch(workdir / "hf" / m)
            chunks = build_model_chunks(arch)
            check(f"{lay}/{m}/ckpt_export", lambda: (load_checkpoint(chunks, workdir / "ckpt" / m),
                                                      same_as_hf(chunks, arch, m)))
            with torch.no_grad():
                for c in chunks:
                    for p in c.parameters():
                        p.zero_()
            check(f"{lay}/{m}/hf_export", lambda: (load_hf_weights(chunks, arch, workdir / "hf" / m),
                                                    same_as_hf(chunks, arch, m)))
            if pp == 1:
                d = check(f"{lay}/{m}/logits", lambda: logits_parity(chunks, arch, m))
                max_diffs[f"{lay}/{m}"] = d
            save_checkpoint(chunks, workdir / "saved" / f"{m}-{lay}", arch)
            if prev_layout is not None:
                fresh = build_model_chunks(arch)
                check(f"{lay}/{m}/saved_reload_from_{prev_layout}",
                      lambda: (load_checkpoint(fresh, workdir / "saved" / f"{m}-{prev_layout}"),
                               same_as_hf(fresh, arch, m)))
        prev_layout = lay

    stream, own = {}, {}
    if do_stream:
        m = "qwen2"
        arch = read_hf_arch(workdir / "hf" / m)
        chunks = build_model_chunks(arch)
        load_hf_weights(chunks, arch, workdir / "hf" / m)
        bucket_bytes = 48 * 1024

        def stream_check():
            stats = ExportStats()
            seen, refs, peak_prev_alive, sizes = {}, [], 0, []
            for bucket in iter_hf_weight_buckets(chunks, arch, bucket_bytes=bucket_bytes, stats=stats):
                # bytes of earlier buckets still alive although this consumer dropped them
                alive = sum(r().numel() * r().element_size() for r in refs if r() is not None)
                if alive:  # gloo work objects can hold tensors in reference cycles: collect, recount
                    gc.collect()
                    alive = sum(r().numel() * r().element_size() for r in refs if r() is not None)
                peak_prev_alive = max(peak_prev_alive, alive)
                sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
                for name, t in bucket:
                    if name in seen:
                        raise AssertionError(f"{name} yielded twice")
                    seen[name] = torch.equal(t.cpu(), hf_state[m][name])
                    refs.append(weakref.ref(t))
                del bucket, t
            if set(seen) != set(hf_state[m]) or not all(seen.values()):
                raise AssertionError("streamed tensors differ from the HF state dict")
            largest = max(t.numel() * t.element_size() for t in hf_state[m].values())
            return dict(bucket_bytes=bucket_bytes, peak_tracked_bytes=stats.peak_bytes,
                        largest_tensor_bytes=largest, prev_buckets_alive_bytes=peak_prev_alive,
                        max_bucket_bytes=max(sizes), num_buckets=len(sizes),
                        total_bytes=stats.exported_bytes)

        stream = check(f"stream/{m}", stream_check) or {}
        own = check(f"own_shards/{m}", lambda: own_shards_check(chunks, arch, hf_state[m], bucket_bytes)) or {}

    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, dict(checks=checks, failures=failures, stream=stream, own=own))
    if dist.get_rank() == 0:
        merged = dict(
            checks=sorted({c for r in everything for c in r["checks"]}),
            failures=[f"rank{i}: {f}" for i, r in enumerate(everything) for f in r["failures"]],
            stream=everything[0]["stream"], streams=[r["stream"] for r in everything],
            owns=[r["own"] for r in everything],
            logits_max_abs_diff=max_diffs, timings=timings,
            world=dist.get_world_size(),
        )
        print(json.dumps(merged))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
