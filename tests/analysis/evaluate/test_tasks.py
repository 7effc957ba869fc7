"""evaluate/tasks.py: --limit, unknown tasks, missing data, and Spec-Bench JSONL files good and bad
(the stock tasks' values: test_lm_eval_tasks.py)."""

import json

import pytest

from llamafactory_macdrop.analysis.evaluate.tasks import TaskError, load_task, load_tasks, parse_task_list


def test_limit_unknown_task_and_missing_data(tmp_path):
    for bad in (0, -1, True, 2.5):
        with pytest.raises(TaskError, match="--limit .* not allowed"):
            load_task("gsm8k", limit=bad)
    with pytest.raises(TaskError, match="--limit 0"):
        load_tasks(["gsm8k"], limit=0)
    with pytest.raises(TaskError) as err:
        load_task("gsm8kk")
    assert "gsm8k, nq_open, squadv2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TaskError) as err:  # no local copy, and the stock dataset is not reachable offline
        load_task("squad", data_root=tmp_path)
    message = str(err.value)
    assert message.startswith(f"squadv2: no copy under {tmp_path}") and "\n" not in message
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
    assert translation.references == (("Hello world",),)
    assert math.kind == "math" and math.references == (("2",),)
    assert task.metrics == ("rouge_l", "chrf", "bleu") and task.stop == () and task.max_new_tokens == 256
    assert load_task(str(path), max_new_tokens=32).max_new_tokens == 32
    assert load_tasks([str(path)])[0].items[3].kind == "context_qa"


@pytest.mark.parametrize(
    "lines, line, says",
    [
        ([{"question_id": 1, "category": "qa", "turns": ["a"]}, "{not json"], 2, "not JSON"),
        ([{"question_id": 1, "category": "qa"}], 1, "not a Spec-Bench question"),
        ([{"question_id": 1, "category": "qa", "turns": []}], 1, "non-empty list"),
        ([{"question_id": 1, "category": "qa", "turns": ["a", 3]}], 1, "non-empty list"),
        ([{"question_id": True, "category": "qa", "turns": ["a"]}], 1, "question_id"),
        ([[1, 2]], 1, "not a Spec-Bench question"),
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
