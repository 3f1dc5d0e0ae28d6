"""Bad input: every malformed file or row is a DataError naming file, row and field, or a counted skip."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luffy_megatron.data import DataError, last_boxed, load_benchmark, read_benchmark, read_luffy_parquet
from luffy_megatron.data.prompts import LUFFY_SYSTEM_PROMPT, make_prompt


def luffy_row(i, *, with_target=True, **override):
    row = {
        "data_source": "",
        "prompt": make_prompt(f"What is {i} + {i}?"),
        "target": [{"role": "assistant", "content": f"<think>\n{i} + {i} = {2 * i}\n</think>\n\\boxed{{{2 * i}}}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        "extra_info": {"split": "train", "index": i},
    }
    if not with_target:
        del row["target"]
    row.update(override)
    return row


def write_parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_good_file_round_trip(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [luffy_row(i) for i in range(3)])
    examples, report = read_luffy_parquet(path, require_target=True)
    assert report.num_bad_rows == 0 and report.num_rows_read == 3
    ex = examples[2]
    assert ex.prompt == [
        {"role": "system", "content": LUFFY_SYSTEM_PROMPT},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    assert ex.demo.startswith("<think>\n") and ex.ground_truth == "4" and ex.data_source == ""
    assert ex.row_index == 2 and ex.problem == "What is 2 + 2?" and ex.extra_info == {"split": "train", "index": 2}


def test_missing_field_names_file_row_field(tmp_path):
    rows = [luffy_row(0), luffy_row(1, reward_model=None), luffy_row(2)]
    path = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(DataError) as err:
        read_luffy_parquet(path, require_target=True)
    assert str(path) in str(err.value) and "row 1" in str(err.value)
    assert "'reward_model'" in str(err.value) and "missing" in str(err.value)


def test_missing_field_skip_is_counted_not_silent(tmp_path, caplog):
    rows = [luffy_row(0), luffy_row(1, reward_model=None), luffy_row(2), luffy_row(3, reward_model=None)]
    path = write_parquet(tmp_path / "train.parquet", rows)
    examples, report = read_luffy_parquet(path, require_target=True, skip_bad_rows=True)
    assert [ex.row_index for ex in examples] == [0, 2]
    assert report.num_bad_rows == 2 and dict(report.reasons) == {"reward_model: missing": 2}
    assert len(examples) + report.num_bad_rows == report.num_rows_read == 4
    assert "skipped 2 of 4 rows" in caplog.text and "row 1" in caplog.text


def test_missing_target_column_for_training(tmp_path):
    path = write_parquet(tmp_path / "val.parquet", [luffy_row(i, with_target=False) for i in range(2)])
    with pytest.raises(DataError, match=r"row 0: field 'target': missing"):
        read_luffy_parquet(path, require_target=True)
    examples, _ = read_luffy_parquet(path, require_target=False)  # fine as a validation file
    assert [ex.demo for ex in examples] == [None, None]


@pytest.mark.parametrize(
    "override, field, problem",
    [
        ({"reward_model": {"style": "rule", "ground_truth": ""}}, "reward_model.ground_truth", "empty string"),
        ({"reward_model": {"style": "rule", "ground_truth": "   "}}, "reward_model.ground_truth", "empty string"),
        ({"prompt": [{"role": "system", "content": "S"}]}, "prompt", "no user message"),
        ({"prompt": [{"role": "user", "content": ""}]}, "prompt", "no user message"),
        ({"target": [{"role": "assistant", "content": ""}]}, "target[0].content", "empty string"),
        ({"target": []}, "target", "empty message list"),
    ],
)
def test_empty_values(tmp_path, override, field, problem):
    path = write_parquet(tmp_path / "t.parquet", [luffy_row(0), luffy_row(1, **override)])
    with pytest.raises(DataError) as err:
        read_luffy_parquet(path, require_target=True)
    assert f"row 1: field '{field}': {problem}" in str(err.value)


def test_wrong_type_ground_truth_number(tmp_path):
    rows = [luffy_row(i, reward_model={"style": "rule", "ground_truth": i}) for i in range(2)]
    path = write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(DataError, match=r"row 0: field 'reward_model.ground_truth': wrong type: expected str, got int"):
        read_luffy_parquet(path, require_target=True)


def test_wrong_type_prompt_string(tmp_path):
    rows = [luffy_row(0, prompt="What is 1 + 1?")]
    path = write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(DataError, match=r"row 0: field 'prompt': wrong type: expected a list"):
        read_luffy_parquet(path, require_target=True)


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [luffy_row(i, reward_model=None) for i in range(3)])
    with pytest.raises(DataError, match="all rows are malformed"):
        read_luffy_parquet(path, require_target=True, skip_bad_rows=True)


# -- whole-file problems ----------------------------------------------------------------------------------


def test_empty_file(tmp_path):
    for name in ("empty.parquet", "empty.jsonl"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.parquet: file is empty"):
        read_luffy_parquet(tmp_path / "empty.parquet", require_target=False)
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        read_benchmark(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"blank\.jsonl: file is empty"):
        read_benchmark(tmp_path / "blank.jsonl")


def test_parquet_with_no_rows(tmp_path):
    schema = pa.Table.from_pylist([luffy_row(0)]).schema
    path = write_parquet(tmp_path / "none.parquet", [], schema=schema)
    with pytest.raises(DataError, match=r"none\.parquet: contains no rows"):
        read_luffy_parquet(path, require_target=True)


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file \x00\x01\x02" * 10)
    with pytest.raises(DataError, match=r"garbage\.parquet: cannot read as parquet"):
        read_luffy_parquet(path, require_target=False)
    # A torn file (the first half of a real one) as well.
    good = write_parquet(tmp_path / "good.parquet", [luffy_row(i) for i in range(50)])
    torn = tmp_path / "torn.parquet"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"torn\.parquet: cannot read as parquet"):
        read_luffy_parquet(torn, require_target=False)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: file not found"):
        read_luffy_parquet(tmp_path / "nope.parquet", require_target=True)
    with pytest.raises(DataError, match=r"aime24\.jsonl: file not found"):
        read_benchmark("aime24", data_root=tmp_path)
    with pytest.raises(DataError, match="unknown benchmark 'aime2024'"):
        read_benchmark("aime2024")


# -- raw benchmark files --------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_benchmark_rows_validated(tmp_path):
    (tmp_path / "bench").mkdir()
    root = tmp_path / "bench"
    write_jsonl(
        root / "aime24.jsonl", [{"problem": "p0", "answer": "1"}, {"problem": "p1"}, {"problem": "p2", "answer": "3"}]
    )
    with pytest.raises(DataError) as err:
        read_benchmark("aime24", data_root=root)
    assert "aime24.jsonl: row 1: field 'answer': missing" in str(err.value)

    items, report = load_benchmark("aime24", data_root=root, skip_bad_rows=True)
    assert [(i["problem"], i["answer"], i["index"]) for i in items] == [("p0", "1", 0), ("p2", "3", 2)]
    assert dict(report.reasons) == {"answer: missing": 1} and report.num_rows_read == 3


@pytest.mark.parametrize(
    "name, file, record, message",
    [
        (
            "aime24",
            "aime24.jsonl",
            {"problem": "p", "answer": ["1"]},
            "field 'answer': wrong type: expected str, got list",
        ),
        ("aime24", "aime24.jsonl", {"problem": "p", "answer": ""}, "field 'answer': empty string"),
        ("aime24", "aime24.jsonl", {"problem": 7, "answer": "1"}, "field 'problem': wrong type: expected str, got int"),
        ("minerva", "minerva_math.jsonl", {"problem": "p", "solution": "it is 3"}, "field 'solution': no \\boxed{...}"),
        (
            "olympiadbench",
            "olympiadbench.jsonl",
            {"question": "q", "final_answer": "$2$"},
            "field 'final_answer': wrong type",
        ),
        (
            "olympiadbench",
            "olympiadbench.jsonl",
            {"question": "q", "final_answer": []},
            "field 'final_answer': empty list",
        ),
        (
            "mmlu_pro",
            "mmlu_pro.parquet",
            {"question": "q", "options": ["a", "b"], "answer": "C"},
            "field 'answer': 'C' is not one of",
        ),
        ("aime24", "aime24.jsonl", "{not json", "field '<json>': line 2 is not valid JSON"),
        ("aime24", "aime24.jsonl", "[1, 2]", "field '<record>': expected a JSON object"),
    ],
)
def test_benchmark_bad_rows(tmp_path, name, file, record, message):
    good = {
        "aime24": {"problem": "p", "answer": "1"},
        "minerva": {"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}."},
        "olympiadbench": {"question": "q", "final_answer": ["$2$"]},
        "mmlu_pro": {"question": "q", "options": ["a", "b"], "answer": "B"},
    }[name]
    if file.endswith(".parquet"):
        path = write_parquet(tmp_path / file, [good, record])
    else:
        path = write_jsonl(tmp_path / file, [good, record])
    with pytest.raises(DataError) as err:
        read_benchmark(path)
    assert f"{file}: row 1: {message}" in str(err.value)
    items, report = load_benchmark(path, skip_bad_rows=True)
    assert len(items) == 1 and report.num_bad_rows == 1


def test_good_benchmark_rules(tmp_path):
    minerva = write_jsonl(
        tmp_path / "minerva_math.jsonl", [{"problem": "p", "solution": "a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}}."}]
    )
    assert read_benchmark(minerva)[0]["answer"] == "\\frac{a}{b^{2}}"
    olymp = write_jsonl(
        tmp_path / "olympiadbench.jsonl", [{"question": "q", "context": None, "final_answer": ["$69$,$84$"]}]
    )
    assert read_benchmark(olymp)[0]["answer"] == "69,84"
    amc = tmp_path / "amc.json"
    amc.write_text(json.dumps([{"problem": "p", "answer": 142.0}, {"problem": "q", "answer": 0.25}]))
    assert [i["answer"] for i in read_benchmark(amc)] == ["142", "0.25"]
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "3 + 4 = 7\n#### 1,007"}])
    assert read_benchmark(gsm)[0] == {"data_source": "gsm", "problem": "q", "answer": "1007", "index": 0}


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\text{(A) }\\{1\\}}") == "\\text{(A) }\\{1\\}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{2} and an unclosed \\boxed{3") == "2"
