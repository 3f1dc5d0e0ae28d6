"""Every file in ../shared/data is read by the data package, with the record counts of its README, and LUFFY's
validation ground truths equal the raw benchmark answers (the README's "Cross-checks done")."""

import re
from collections import Counter, defaultdict

import pytest

from luffy_megatron.data import BENCHMARKS, LUFFY_SYSTEM_PROMPT, normalize_answer, read_benchmark, read_luffy_parquet
from tests.helpers import SHARED

DATA = SHARED / "data"
pytestmark = pytest.mark.skipif(not (DATA / "README.md").is_file(), reason=f"no shared data at {DATA}")

# `| `eval/aime24.jsonl` | 30 | ...` and `| `eval/amc.json` (a JSON list) | 83 | ...`
_TABLE_ROW = re.compile(r"^\|\s*`([^`]+)`[^|]*\|\s*(\d+)\s*\|", re.MULTILINE)


def readme_counts() -> dict[str, int]:
    counts = {path: int(n) for path, n in _TABLE_ROW.findall((DATA / "README.md").read_text())}
    assert len(counts) >= 13, counts  # the README's two tables
    return counts


def count_records(relative: str) -> int:
    path = DATA / relative
    if relative.startswith("eval/luffy/"):
        examples, report = read_luffy_parquet(path, require_target=False)
        assert report.num_bad_rows == 0
        return len(examples)
    return len(read_benchmark(path))  # registry rules by file name; generic rules for train/*.jsonl


def test_every_shared_data_file_is_in_the_readme_table():
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.name != "README.md"}
    assert on_disk == set(readme_counts())


@pytest.mark.parametrize("relative", sorted(readme_counts()) if (DATA / "README.md").is_file() else [])
def test_record_count_matches_readme(relative):
    assert count_records(relative) == readme_counts()[relative]


def test_registry_files_exist_and_cover_the_benchmarks():
    for name in ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench", "arc_c", "mmlu_pro"):
        assert (DATA / "eval" / BENCHMARKS[name].file).is_file(), name


def test_benchmark_answer_rules():
    olympiad = read_benchmark("olympiadbench", data_root=DATA / "eval")
    assert olympiad[1]["answer"] == "\\frac{1}{2 n+2}"  # "$...$" stripped from final_answer[0]
    assert not any(item["answer"].startswith("$") for item in olympiad)
    amc = read_benchmark("amc", data_root=DATA / "eval")
    assert amc[0]["answer"] == "142"  # the float 142.0
    minerva = read_benchmark("minerva", data_root=DATA / "eval")
    assert minerva[0]["answer"] == "1.6"  # last \boxed{} of the solution
    assert all("\\boxed" not in item["answer"] for item in minerva)
    mmlu = read_benchmark("mmlu_pro", data_root=DATA / "eval")
    assert mmlu[0]["answer"] == "I" and "\nI) Unsafe practices, Distress, Fear, Serious" in mmlu[0]["problem"]
    assert set(item["answer"] for item in mmlu) <= set("ABCDEFGHIJ")
    arc = read_benchmark("arc_c", data_root=DATA / "eval")
    assert arc[0]["data_source"] == "arc_c"
    # ARC-c labels its options A-E, or 1-4 for 22 questions (upstream's own labels, kept by LUFFY).
    assert Counter(item["answer"] for item in arc if item["answer"].isdigit()).total() == 22
    assert all(f"\n{item['answer']}) " in item["problem"] for item in arc)
    assert "Your task is to follow" not in arc[0]["problem"]  # the user message only


# LUFFY data_source -> our registry name of the raw file.
LUFFY_TO_RAW = {
    "aime": "aime24",
    "aime25": "aime25",
    "amc": "amc",
    "math": "math500",
    "minerva": "minerva",
    "olympiad_bench": "olympiadbench",
}
# Per data_source: rows, from the README ("Records are repeated so that averaging gives avg@k").
ROWS = {
    "valid.parquet": {"aime": 240, "amc": 332, "math": 500, "minerva": 272, "olympiad_bench": 675},
    "valid.all.parquet": {"aime": 960, "aime25": 960, "amc": 2656, "math": 500, "minerva": 272, "olympiad_bench": 675},
}
UNIQUE = {"aime": 30, "aime25": 30, "amc": 83, "math": 500, "minerva": 272, "olympiad_bench": 675}


@pytest.mark.parametrize("file_name", sorted(ROWS))
def test_luffy_validation_ground_truths_equal_raw_answers(file_name):
    examples, _ = read_luffy_parquet(DATA / "eval" / "luffy" / file_name, require_target=False)
    assert Counter(ex.data_source for ex in examples) == ROWS[file_name]
    assert all(ex.demo is None and [m["role"] for m in ex.prompt] == ["system", "user"] for ex in examples)
    assert all(ex.prompt[0]["content"] == LUFFY_SYSTEM_PROMPT for ex in examples)  # our constant is verbatim

    luffy: dict[str, dict[str, str]] = defaultdict(dict)  # data_source -> problem -> ground truth
    for ex in examples:
        previous = luffy[ex.data_source].setdefault(ex.problem, ex.ground_truth)
        assert previous == ex.ground_truth, "a repeated problem must keep its ground truth"
    for source, by_problem in luffy.items():
        raw = read_benchmark(LUFFY_TO_RAW[source], data_root=DATA / "eval")
        assert len(by_problem) == len(raw) == UNIQUE[source], source
        # The answers, one per unique problem, are the same multiset (AIME's problem texts are formatted
        # differently in the two copies, so compare answers, not pairs).
        assert sorted(normalize_answer(a) for a in by_problem.values()) == sorted(
            normalize_answer(item["answer"]) for item in raw
        ), source
        # Where the problem texts are identical, each problem has the same answer.
        for item in raw:
            if item["problem"] in by_problem:
                assert normalize_answer(by_problem[item["problem"]]) == normalize_answer(item["answer"]), item
        if source in ("math", "minerva", "olympiad_bench", "amc"):
            assert all(item["problem"] in by_problem for item in raw), source


def test_normalize_answer_is_a_real_comparison():
    # The cross-check above would pass vacuously if normalize_answer mapped everything to one string.
    assert normalize_answer("142.0") == normalize_answer("142") != normalize_answer("143")
    assert normalize_answer("$2n$") == "2n" != normalize_answer("2n+1")
    assert normalize_answer("336^\\circ") == normalize_answer("336")
