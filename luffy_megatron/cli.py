"""Console entry points (pyproject.toml [project.scripts]); each imports its program lazily."""


def train_main() -> int:
    from luffy_megatron.train.loop import main

    return main()


def eval_main() -> int:
    from luffy_megatron.eval import main

    return main()


def convert_main() -> int:
    from luffy_megatron.convert.cli import main

    return main()
