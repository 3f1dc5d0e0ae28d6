#!/usr/bin/env python
"""megatron-core checkpoint -> HF safetensors. Same as `luffy-convert megatron-to-hf ...`."""

import sys

from luffy_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["megatron-to-hf", *sys.argv[1:]]))
