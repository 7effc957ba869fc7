"""evaluate/longbench.py on tiny LongBench-format files: the group, lm-eval's own task with only
the data source and pred.py's middle truncation added (oracle: lm-eval's YAML rendered by jinja2
here, the truncation computed by hand), missing data and bad values in one line. Scores through
the real path: tests/cli/test_gen_tasks_cli.py."""

import json
import re

import pytest
import yaml
from helpers import tiny
from helpers.lm_eval_longbench import LONGBENCH

from llamafactory_macdrop.analysis.evaluate import longbench as lb
from llamafactory_macdrop.analysis.evaluate.tasks import TaskError

CHINESE = {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in green trees".split()
TREC_CLASSES = ["Other", "Other location", "City", "Animal", "Definition of something"]


def _row(dataset, n, question, context, answers, classes=None, with_id=True):
    row = {
        "input": question,
        "context": context,
        "answers": answers,
        "length": len(context.split()),
        "dataset": dataset,
        "language": "en",
        "all_classes": classes,
    }
    if with_id:
        row["_id"] = f"{dataset}-{n}"
    return row


ROWS = {
    "hotpotqa": [
        _row("hotpotqa", 1, "Which band formed first?", "Passage 1:\nThe Beatles formed in 1960.", ["The Beatles"]),
        _row("hotpotqa", 2, "Where is the tower?", "Passage 1:\nThe tower is in Paris.", ["France", "Paris"]),
        _row("hotpotqa", 3, "Who sings?", "Passage 1:\nSeven small birds sing.", ["birds"], with_id=False),
    ],
    "trec": [
        _row("trec", 1, "What city is the tower in?", "Question: Where?\nType: Other location", ["City"], TREC_CLASSES),
        _row(
            "trec", 2, "What is a fox?", "Question: What is X?\nType: Definition of something", ["Animal"], TREC_CLASSES
        ),
    ],
    "passage_retrieval_en": [
        _row("passage_retrieval_en", 1, "A fox jumps.", "Paragraph 1: dogs\n\nParagraph 2: a fox", ["Paragraph 2"]),
        _row("passage_retrieval_en", 2, "Birds sing.", "Paragraph 1: birds\n\nParagraph 2: trees", ["Paragraph 1"]),
    ],
}


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path):
    for dataset, rows in ROWS.items():
        _write_jsonl(tmp_path / "longbench" / f"{dataset}.jsonl", rows)
    return tmp_path / "longbench"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.build_tokenizer(tmp_path_factory.mktemp("tok"))  # puts a BOS before every text, like Llama


def _yaml(name):
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((LONGBENCH / name).read_text(), Loader=Loader)


# ----------------------------------------------------------------------------- names
def test_group_is_the_16_english_datasets_of_lm_evals_groups():
    groups = ("single", "multi", "summarization", "fewshot", "synthetic", "code")
    members = [t for g in groups for t in _yaml(f"_longbench_{g}.yaml")["task"]]
    assert len(members) == 21 and set(_yaml("_longbench.yaml")["task"]) == {f"longbench_{g}" for g in groups}
    english = [t for t in members if t[len("longbench_") :] not in CHINESE]
    assert lb.expand_names(["longbench"]) == english == list(lb.TASKS)  # the paper's order = lm-eval's
    assert len(lb.TASKS) == 16
    assert lb.expand_names(["longbench_trec", "longbench", "longbench_trec"])[:2] == [
        "longbench_trec",
        "longbench_narrativeqa",
    ]
    assert len(lb.expand_names(["longbench_trec", "longbench"])) == 16


def test_no_chat_template_tasks_are_lm_evals_note():
    readme = (LONGBENCH / "README.md").read_text()
    note = readme[readme.index("[!NOTE]") : readme.index("### Groups")]
    listed = set(re.findall(r"-\s+(longbench_[\w-]+)", note)) - {"longbench_fewshot", "longbench_code"}
    assert listed - {"longbench_lsht"} == lb.NO_CHAT_TEMPLATE_TASKS  # lsht is Chinese


def test_unknown_names_are_refused():
    with pytest.raises(TaskError, match="unknown LongBench task 'longbench_lsht'.*longbench_hotpotqa"):
        lb.expand_names(["longbench_lsht"])


# ----------------------------------------------------------------------------- truncation
def test_truncation_keeps_pred_pys_halves_with_a_bos(tok):
    text = "".join(" " + w for w in WORDS)
    assert tok(text)["input_ids"][0] == tok.bos_token_id and len(tok(text)["input_ids"]) == 18  # BOS + one id a word
    assert lb.truncate_middle(text, tok, 18) == text  # fits: untouched
    # 8: half 4 from each end; the BOS is the first of the head's 4 ids, and decoding skips it
    assert lb.truncate_middle(text, tok, 8) == " the quick brown sing in green trees"
    assert lb.truncate_middle(text, tok, 9) == " the quick brown sing in green trees"  # int(9 / 2) = 4
    assert lb.truncate_middle(text, tok, 17) == "".join(" " + w for w in WORDS[:7] + WORDS[-8:])


def test_truncation_without_a_bos(tmp_path):
    chatml = tiny.build_chatml_tokenizer(tmp_path)
    text = "".join(" " + w for w in WORDS)
    assert len(chatml(text)["input_ids"]) == 17  # no special token before the text
    assert lb.truncate_middle(text, chatml, 8) == " the quick brown fox sing in green trees"


def test_long_prompt_is_truncated_in_the_middle(tmp_path, tok):
    long_row = _row("hotpotqa", 1, "Who sings?", "Passage 1:\n" + " ".join(WORDS * 40), ["birds"])
    folder = tmp_path / "lb"
    _write_jsonl(folder / "hotpotqa.jsonl", [long_row])
    (spec,) = lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=folder, max_length=64)
    doc = spec.task.eval_docs[0]
    full = _render(_yaml("hotpotqa.yaml")["doc_to_text"], {**long_row, "question": long_row["input"]})
    ids = tok(full, truncation=False)["input_ids"]
    assert len(ids) > 64
    expected = tok.decode(ids[:32], skip_special_tokens=True) + tok.decode(ids[-32:], skip_special_tokens=True)
    assert spec.task.doc_to_text(doc) == expected and expected.endswith("Question: Who sings?\nAnswer:")
    assert expected.startswith("Answer the question based on the given passages.")
    assert spec.protocol(True)["truncation"] == {"rule": "LongBench pred.py middle", "max_length": 64}
    assert "middle truncation of the prompt to 64 tokens" in spec.protocol(True)["lm_eval"]["deviations"][0]


def _render(template, doc):
    from jinja2 import BaseLoader, Environment, StrictUndefined

    return (
        Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
        .from_string(template)
        .render(**doc)
    )


def test_tasks_are_lm_evals_own_reading_the_files(data_dir, tok):
    specs = lb.load_longbench(["longbench_hotpotqa", "longbench_trec"], tokenizer=tok, data_dir=data_dir)
    hotpot, trec = specs
    assert [s.name for s in specs] == ["longbench_hotpotqa", "longbench_trec"]
    assert [d["_id"] for d in hotpot.task.eval_docs] == ["hotpotqa-1", "hotpotqa-2", None]  # file order
    config = _yaml("hotpotqa.yaml")
    doc = hotpot.task.eval_docs[0]
    assert hotpot.task.doc_to_text(doc) == _render(
        config["doc_to_text"], {**ROWS["hotpotqa"][0], "question": ROWS["hotpotqa"][0]["input"]}
    )
    assert hotpot.task.config.generation_kwargs["max_gen_toks"] == config["generation_kwargs"]["max_gen_toks"]
    assert (hotpot.chat_template, trec.chat_template) == (None, False) and trec.kind == "short_qa"
    assert hotpot.protocol(True)["lm_eval"]["data"] == str(data_dir / "hotpotqa.jsonl")


@pytest.mark.parametrize("bad", [1, 0, -5, True, "7500", 7500.0])
def test_max_length_must_be_an_integer_of_at_least_2(bad, data_dir):
    with pytest.raises(TaskError, match=r"--max-length .* is not allowed: an integer >= 2"):
        lb.check_longbench(["longbench_hotpotqa"], data_dir, max_length=bad)


def test_missing_files_and_positions_are_one_line(data_dir):
    with pytest.raises(TaskError) as err:
        lb.check_longbench(["longbench_hotpotqa", "longbench_qasper", "longbench_musique"], data_dir)
    assert str(err.value) == (
        f"LongBench data not found for qasper.jsonl, musique.jsonl in {data_dir} (--longbench-dir: LongBench's "
        "release layout, DIR/<dataset>.jsonl)"
    )
    with pytest.raises(TaskError, match="--max-length 7500 \\+ a 32-token answer is more than the model's 4096"):
        lb.check_longbench(["longbench_hotpotqa"], data_dir, max_positions=4096)
    bad = data_dir / "bad"
    _write_jsonl(bad / "trec.jsonl", [{"input": "x"}])
    with pytest.raises(TaskError, match="trec.jsonl:1: not a LongBench row"):
        lb.load_longbench(["longbench_trec"], tokenizer=None, data_dir=bad)
