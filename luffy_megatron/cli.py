"""Console entry points. Programs that are not built yet say so and exit non-zero."""

import sys


def _not_yet(name: str, issue: str) -> int:
    print(f"{name}: not yet available in this version of luffy-megatron ({issue}).", file=sys.stderr)
    return 2


def train_main() -> int:
    return _not_yet("luffy-train", "the training program is being built; see README 'Status'")


def eval_main() -> int:
    from luffy_megatron.eval import main

    return main()


def convert_main() -> int:
    from luffy_megatron.convert.cli import main

    return main()
