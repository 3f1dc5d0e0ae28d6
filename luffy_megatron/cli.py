"""Console entry points (pyproject.toml [project.scripts])."""


def train_main() -> int:
    from luffy_megatron.train.loop import main  # lazy: each command loads only its own program

    return main()


def eval_main() -> int:
    from luffy_megatron.eval import main  # lazy: luffy-eval loads no Ray and no Megatron

    return main()


def convert_main() -> int:
    from luffy_megatron.convert.cli import main  # lazy: each command loads only its own program

    return main()


def data_main() -> int:
    from luffy_megatron.prepare import main  # lazy: each command loads only its own program

    return main()
