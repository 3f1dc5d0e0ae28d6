#!/usr/bin/env python
"""HF -> megatron-core checkpoint. Same as `luffy-convert hf-to-megatron ...`."""

import sys

from luffy_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["hf-to-megatron", *sys.argv[1:]]))
