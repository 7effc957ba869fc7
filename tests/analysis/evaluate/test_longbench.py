"""evaluate/longbench.py on tiny LongBench-format files: the group, prompts against lm-eval's own
rendering (lm_eval.utils.apply_template on the installed YAML's doc_to_text: lm-eval's Task object
cannot be built offline, it downloads its dataset when constructed), pred.py's middle truncation on
a hand-built case, per-item scores against lm-eval's metrics.py called directly, missing data.

The oracle for metrics is lm-eval's metrics.py, loaded from its file here (packages it imports
that are not installed are replaced by mocks; the English QA, classification, retrieval and count
functions use none of them). ROUGE and code-similarity cases run where ``rouge`` and
``fuzzywuzzy`` are installed (requirements/runtime.txt installs both).
"""

import json
import re
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import tiny
from helpers.lm_eval_longbench import LONGBENCH, lm_eval_metrics

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


@pytest.fixture(scope="module")
def lm_metrics():
    """lm-eval's tasks/longbench/metrics.py itself (the oracle), not the module's wrappers."""
    return lm_eval_metrics()


def _yaml(name):
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((LONGBENCH / name).read_text(), Loader=Loader)


def _longbench_eval(fn, dataset, prediction, answers, classes=None):
    """LongBench's eval.py scorer for one item, over lm-eval's per-answer function ``fn``."""
    if dataset in ("trec", "triviaqa", "samsum", "lsht"):
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for answer in answers:
        score = max(score, fn(prediction, answer, all_classes=classes))
    return score


# ----------------------------------------------------------------------------- names
def test_group_is_the_16_english_datasets_of_lm_evals_groups():
    groups = ("single", "multi", "summarization", "fewshot", "synthetic", "code")
    members = [t for g in groups for t in _yaml(f"_longbench_{g}.yaml")["task"]]
    assert len(members) == 21 and set(_yaml("_longbench.yaml")["task"]) == {f"longbench_{g}" for g in groups}
    english = [t for t in members if t[len("longbench_") :] not in CHINESE]
    assert lb.expand_names(["longbench"]) == english == list(lb.TASKS)  # the paper's order = lm-eval's
    assert len(lb.TASKS) == 16 and lb.is_longbench("longbench") and lb.is_longbench("longbench_repobench-p")
    assert not lb.is_longbench("longbench_lsht") and not lb.is_longbench("hotpotqa")
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


# ----------------------------------------------------------------------------- tasks and prompts
def test_tasks_read_lm_evals_config_and_the_files(data_dir, tok):
    names = ["longbench_trec", "longbench_hotpotqa", "longbench_passage_retrieval_en", "longbench_trec"]
    tasks = lb.load_longbench(names, tokenizer=tok, data_dir=data_dir, max_length=100_000)
    assert [t.name for t in tasks] == ["longbench_trec", "longbench_hotpotqa", "longbench_passage_retrieval_en"]
    trec, hotpot, retrieval = tasks
    for task in tasks:
        config = _yaml(f"{task.name[len('longbench_') :]}.yaml")
        assert task.max_new_tokens == config["generation_kwargs"]["max_gen_toks"]
        assert task.stop == tuple(config["generation_kwargs"]["until"])
        assert task.source == str(data_dir / f"{task.name[len('longbench_') :]}.jsonl")
        assert task.prompt_format.startswith(f"lm-eval {task.name} doc_to_text, middle-truncated to 100000 tokens")
    assert (trec.max_new_tokens, trec.stop, hotpot.max_new_tokens, hotpot.stop) == (64, ("\n",), 32, ())
    assert trec.metrics == ("longbench_classification:trec",) and "without a chat template" in trec.prompt_format
    assert hotpot.metrics == ("longbench_qa_f1",) and retrieval.metrics == ("longbench_retrieval",)
    assert [i.id for i in hotpot.items] == ["hotpotqa-1", "hotpotqa-2", "3"]  # _id, else the line number
    assert hotpot.items[1].references == (("France", "Paris"),) and hotpot.available == 3
    assert {i.kind for i in hotpot.items} == {"context_qa"} and trec.items[0].kind == "short_qa"

    limited = lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=data_dir, limit=2)[0]
    assert [i.id for i in limited.items] == ["hotpotqa-1", "hotpotqa-2"] and limited.available == 3


def test_prompt_is_lm_evals_doc_to_text(data_dir, tok):
    from lm_eval.utils import apply_template

    names = ["longbench_hotpotqa", "longbench_trec", "longbench_passage_retrieval_en"]
    tasks = lb.load_longbench(names, tokenizer=tok, data_dir=data_dir)
    for task in tasks:
        dataset = task.name[len("longbench_") :]
        template = _yaml(f"{dataset}.yaml")["doc_to_text"]
        for item, row in zip(task.items, ROWS[dataset]):
            assert item.turns == (apply_template(template, {**row, "question": row["input"]}),)
    assert tasks[0].items[0].turns[0].endswith("Question: Which band formed first?\nAnswer:")


@pytest.mark.parametrize(
    "line, what",
    [
        ("{not json", "not JSON"),
        ('{"input": "q", "context": "c"}', "missing answers"),
        ('{"context": "c", "answers": ["a"]}', "missing input"),
        ('{"input": "q", "context": "c", "answers": "a"}', "answers 'a' is not a list of strings"),
        ('["a"]', "not a JSON object but list"),
    ],
)
def test_bad_rows_are_one_line_naming_the_line(line, what, tmp_path, tok):
    good = json.dumps(_row("hotpotqa", 1, "q", "c", ["a"]))
    (tmp_path / "hotpotqa.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(TaskError, match=re.escape(f"{tmp_path / 'hotpotqa.jsonl'}:2: {what}")):
        lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=tmp_path)


def test_duplicate_ids_are_refused(tmp_path, tok):
    row = _row("hotpotqa", 1, "q", "c", ["a"])
    _write_jsonl(tmp_path / "hotpotqa.jsonl", [row, row])
    with pytest.raises(TaskError, match="hotpotqa.jsonl:2: _id 'hotpotqa-1' again"):
        lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=tmp_path)


@pytest.mark.parametrize(
    "text, what",
    [
        (None, "cannot read lm-eval's longbench_hotpotqa config"),
        ("task: [unclosed", "cannot read lm-eval's longbench_hotpotqa config"),
        ("task: longbench_trec\n", "task is 'longbench_trec'"),
        ("task: longbench_hotpotqa\ndoc_to_text: x\ngeneration_kwargs: {max_gen_toks: 0}\n", "max_gen_toks 0"),
    ],
)
def test_lm_eval_config_that_does_not_read_is_one_line(text, what, tmp_path, monkeypatch):
    if text is not None:
        (tmp_path / "hotpotqa.yaml").write_text(text)
    monkeypatch.setattr(lb, "lm_eval_longbench_dir", lambda: tmp_path)
    lb.lm_eval_config.cache_clear()
    try:
        with pytest.raises(TaskError) as err:
            lb.check_longbench(["longbench_hotpotqa"], tmp_path)
        assert (
            what in str(err.value) and "\n" not in str(err.value) and str(tmp_path / "hotpotqa.yaml") in str(err.value)
        )
    finally:
        lb.lm_eval_config.cache_clear()


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
    (item,) = lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=folder, max_length=64)[0].items
    full = lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=folder, max_length=100_000)[0].items[0]
    ids = tok(full.turns[0], truncation=False)["input_ids"]
    assert len(ids) > 64
    expected = tok.decode(ids[:32], skip_special_tokens=True) + tok.decode(ids[-32:], skip_special_tokens=True)
    assert item.turns == (expected,) and expected.endswith("Question: Who sings?\nAnswer:")
    assert expected.startswith("Answer the question based on the given passages.")


@pytest.mark.parametrize("bad", [1, 0, -5, True, "7500", 7500.0, None])
def test_max_length_must_be_an_integer_of_at_least_2(bad, data_dir, tok):
    with pytest.raises(TaskError, match=r"max_length .* is not allowed: an integer >= 2"):
        lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=data_dir, max_length=bad)


def test_limit_must_be_positive(data_dir, tok):
    with pytest.raises(TaskError, match="limit 0 is not allowed"):
        lb.load_longbench(["longbench_hotpotqa"], tokenizer=tok, data_dir=data_dir, limit=0)


# ----------------------------------------------------------------------------- metrics
def test_qa_f1_is_lm_evals_with_the_max_over_answers(lm_metrics):
    score = lb.metric("longbench_qa_f1")
    for prediction, answers in [
        ("Paris", ["France", "Paris"]),
        ("It is in Paris, France.", ["France", "Paris"]),
        ("the Beatles", ["The Beatles"]),
        ("no idea", ["birds"]),
        ("Paris\nFrance", ["Paris"]),  # hotpotqa keeps every line
    ]:
        expected = _longbench_eval(lm_metrics.qa_f1_score, "hotpotqa", prediction, answers)
        assert score(prediction, answers) == expected
    assert score("Paris", ["France", "Paris"]) == 1.0 and lm_metrics.qa_f1_score("Paris", "France") == 0  # the max
    triviaqa = lb.metric("longbench_qa_f1:triviaqa")  # first line only
    assert triviaqa("\nParis\nFrance Germany", ["Paris"]) == 1.0 > score("\nParis\nFrance Germany", ["Paris"])
    doc = {"answers": ["France", "Paris"]}
    assert (
        score("It is in Paris, France.", doc["answers"])
        == lm_metrics.get_qa_f1_with_score(doc, ["It is in Paris, France."])["score"]
    )


def test_classification_uses_the_tasks_classes(data_dir, tok, lm_metrics):
    lb.load_longbench(["longbench_trec"], tokenizer=tok, data_dir=data_dir, limit=1)
    score = lb.metric("longbench_classification:trec")
    for prediction, answers in [
        ("City", ["City"]),
        ("City or Animal", ["City"]),  # two classes named: 1/2
        ("Other location", ["Other location"]),  # "Other" is inside the gold and dropped
        ("\nAnimal\nCity", ["Animal"]),  # first line only
        ("Animal", ["City"]),
    ]:
        expected = _longbench_eval(lm_metrics.classification_score, "trec", prediction, answers, TREC_CLASSES)
        assert score(prediction, answers) == expected
    assert (score("City or Animal", ["City"]), score("Other location", ["Other location"])) == (0.5, 1.0)
    assert score("\nAnimal\nCity", ["Animal"]) == 1.0
    doc = {"answers": ["City"], "all_classes": TREC_CLASSES}
    assert (
        score("City or Animal", ["City"]) == lm_metrics.get_classification_with_score(doc, ["City or Animal"])["score"]
    )


def test_retrieval_and_count_are_lm_evals(lm_metrics):
    retrieval, count = lb.metric("longbench_retrieval"), lb.metric("longbench_count")
    for prediction in ["Paragraph 2", "Paragraph 2 or 3", "none", "Paragraph 20"]:
        assert retrieval(prediction, ["Paragraph 2"]) == _longbench_eval(
            lm_metrics.retrieval_score, "passage_retrieval_en", prediction, ["Paragraph 2"]
        )
        assert count(prediction, ["2"]) == _longbench_eval(lm_metrics.count_score, "passage_count", prediction, ["2"])
    assert retrieval("Paragraph 2 or 3", ["Paragraph 2"]) == 0.5
    doc = {"answers": ["Paragraph 2"]}
    assert (
        retrieval("Paragraph 2 or 3", doc["answers"])
        == lm_metrics.get_retrieval_with_score(doc, ["Paragraph 2 or 3"])["score"]
    )


def test_rouge_is_lm_evals(lm_metrics):
    pytest.importorskip("rouge")
    samsum, rouge = lb.metric("longbench_rouge:samsum"), lb.metric("longbench_rouge")
    prediction, answers = "\nAnn will bring the cake.\nBob: ok", ["Ann brings a cake.", "Ann will bring the cake."]
    assert samsum(prediction, answers) == _longbench_eval(lm_metrics.rouge_score, "samsum", prediction, answers)
    assert samsum(prediction, answers) == pytest.approx(1.0) and rouge(prediction, answers) < samsum(
        prediction, answers
    )


def test_code_sim_is_lm_evals(lm_metrics):
    pytest.importorskip("fuzzywuzzy")
    score = lb.metric("longbench_code_sim")
    for prediction in ["    return x + 1\n", "# comment\nreturn x + 1", "", "print(x)"]:
        expected = _longbench_eval(lm_metrics.code_sim_score, "lcc", prediction, ["return x + 1", "return x"])
        assert score(prediction, ["return x + 1", "return x"]) == expected


def test_a_missing_metric_package_refuses_only_its_tasks(monkeypatch):
    lb.lm_eval_metrics.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge", None)  # import rouge: ImportError
    try:
        with pytest.raises(TaskError) as err:
            lb.check_longbench(["longbench_hotpotqa", "longbench_gov_report", "longbench_samsum"], Path("/nowhere"))
        assert "rouge for longbench_gov_report, longbench_samsum" in str(err.value) and "\n" not in str(err.value)
        assert "hotpotqa" not in str(err.value)
        with pytest.raises(TaskError, match="'rouge' package"):
            lb.metric("longbench_rouge")
        assert lb.metric("longbench_qa_f1")("Paris", ["Paris"]) == 1.0
    finally:
        lb.lm_eval_metrics.cache_clear()


@pytest.mark.parametrize("name", ["qa_f1", "longbench_f1", "longbench_qa_f1:lsht", "longbench_classification"])
def test_unknown_metric_names_are_refused(name):
    with pytest.raises(TaskError, match=re.escape(repr(name))):
        lb.metric(name)


# ----------------------------------------------------------------------------- missing data
def test_missing_files_are_one_line_naming_them_and_the_folder(data_dir, tok):
    (data_dir / "trec.jsonl").unlink()
    (data_dir / "passage_retrieval_en.jsonl").unlink()
    names = ["longbench_hotpotqa", "longbench_trec", "longbench_passage_retrieval_en"]
    for call in (
        lambda: lb.check_longbench(names, data_dir),
        lambda: lb.load_longbench(names, tokenizer=tok, data_dir=data_dir),
    ):
        with pytest.raises(TaskError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and str(data_dir) in message and "--longbench-dir" in message
        assert "trec.jsonl, passage_retrieval_en.jsonl" in message and "hotpotqa.jsonl" not in message


def test_without_a_folder_the_caches_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TaskError) as err:
        lb.check_longbench(["longbench_trec"])
    message = str(err.value)
    assert "\n" not in message and "trec.jsonl" in message and "--longbench-dir" in message
    for place in (
        tmp_path / "datasets/downloads/extracted/*/data/trec.jsonl",
        tmp_path / "datasets/THUDM___long_bench/trec",
        tmp_path / "datasets/Xnhyacinth___long_bench/trec",
        tmp_path / "hub/datasets--THUDM--LongBench/snapshots/*/data.zip",
    ):
        assert str(place) in message


def _cache_copy(form, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, cache, hub = ROWS["trec"], tmp_path / "datasets", tmp_path / "hub"
    if form == "extracted":
        return _write_jsonl(cache / "downloads/extracted/0a1b/data/trec.jsonl", rows)
    if form == "zip":
        path = hub / "datasets--THUDM--LongBench/snapshots/abc123/data.zip"
        path.parent.mkdir(parents=True)
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("data/trec.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return path
    table = pa.Table.from_pylist([{**r, "all_classes": r["all_classes"]} for r in rows])
    if form == "arrow":
        path = cache / "Xnhyacinth___long_bench/trec/0.0.0/f00d/long_bench-test.arrow"
        path.parent.mkdir(parents=True)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)  # the datasets cache's format: an arrow stream
        return path
    path = hub / "datasets--THUDM--LongBench/snapshots/abc123/trec/test/0000.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("form", ["extracted", "zip", "arrow", "parquet"])
def test_a_cached_copy_is_found(form, tmp_path, monkeypatch, tok):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = _cache_copy(form, tmp_path)
    lb.check_longbench(["longbench_trec"])
    (task,) = lb.load_longbench(["longbench_trec"], tokenizer=tok)
    assert str(path) in task.source and [i.id for i in task.items] == ["trec-1", "trec-2"] and task.available == 2
    assert task.items[0].references == (("City",),)
