"""evaluate/scoring.py on hand cases; the library metrics against the libraries called directly;
a planted model's known answers scored end to end against hand-computed values."""

import math

import pytest
import sacrebleu
from helpers.tiny_answers import build_successor_llama
from rouge_score import rouge_scorer

from llamafactory_macdrop.analysis.evaluate.scoring import (
    aggregate,
    bleu,
    chrf,
    exact_match,
    extract_number,
    normalize_answer,
    number_match,
    rouge_l,
    score_item,
    score_turns,
    token_f1,
)


@pytest.mark.parametrize(
    "text, number",
    [
        ("Janet sells 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,450,000", "1450000"),
        ("The answer is 1,450,000.", "1450000"),
        ("It costs $18.50.", "18.50"),
        ("The temperature falls to -7 degrees.", "-7"),
        ("so 5-3=2", "2"),  # a hyphen after a digit is not a sign
        ("#### -5", "-5"),
        ("first 3, then #### 42 and 9 later", "42"),  # after ####, its first number
        ("1,2,3", "3"),  # not one number with odd commas
        ("no number here", None),
        ("#### none", None),
    ],
)
def test_gsm8k_final_number(text, number):
    assert extract_number(text) == number


def test_gsm8k_match_compares_numbers():
    assert number_match("So the answer is 18.", ["18"]) == 1.0
    assert number_match("#### 18.00", ["18"]) == 1.0
    assert number_match("#### 1450000", ["1,450,000"]) == 1.0
    assert number_match("the answer is 17", ["18"]) == 0.0
    assert number_match("I do not know", ["18"]) == 0.0
    assert number_match("#### -3", ["3"]) == 0.0


@pytest.mark.parametrize(
    "text, normal",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,  a pear ", "apple pear"),
        ("Theatre of the absurd", "theatre of absurd"),  # "the" inside a word stays
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_squad_normalization(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_by_hand():
    golds = ["Justin Timberlake", "Timberlake"]
    assert exact_match("justin timberlake.", golds) == 1.0
    assert exact_match("Justin", golds) == 0.0
    # "Justin Randall Timberlake" vs "Justin Timberlake": 2 common, P 2/3, R 1 -> F1 0.8
    assert token_f1("Justin Randall Timberlake", golds) == pytest.approx(0.8)
    # best gold: "Timberlake" vs "the Timberlake show": P 1/2, R 1 -> 2/3; vs the first gold: P 1/2 R 1/2
    assert token_f1("the Timberlake show", golds) == pytest.approx(2 / 3)
    assert token_f1("", golds) == 0.0 and token_f1("the", ["a"]) == 1.0  # both empty after normalization


def test_library_metrics_are_the_libraries():
    hyp, refs = "the cats sat on the mat today", ["the cat sat on the mat", "a cat was sitting on a mat"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l(hyp, refs) == max(scorer.score(r, hyp)["rougeL"].fmeasure for r in refs)
    assert chrf(hyp, refs) == sacrebleu.sentence_chrf(hyp, refs).score
    assert bleu(hyp, refs) == sacrebleu.sentence_bleu(hyp, refs).score
    assert 0 < rouge_l(hyp, refs) <= 1 and 0 < chrf(hyp, refs) <= 100


def test_turns_items_and_aggregates():
    scores = score_turns(["exact_match", "f1"], ["blue", "green grass"], [("blue",), ("green",)])
    assert scores == {"exact_match": 0.5, "f1": pytest.approx((1 + 2 / 3) / 2)}
    assert score_turns(["rouge_l"], ["a", "b"], [(), ()]) == {"rouge_l": None}  # no reference: no score
    assert score_turns(["exact_match"], ["x", "b"], [(), ("b",)]) == {"exact_match": 1.0}
    with pytest.raises(ValueError, match="unknown metric accuracy"):
        score_turns(["accuracy"], ["a"], [("a",)])
    rows = aggregate([{"exact_match": 1.0, "rouge_l": None}, {"exact_match": 0.0, "rouge_l": 0.5}])
    assert rows == {"exact_match": {"mean": 0.5, "n": 2}, "rouge_l": {"mean": 0.5, "n": 1}}
    assert math.isnan(aggregate([{"bleu": None}])["bleu"]["mean"])


def test_a_planted_models_known_answers_score_as_computed_by_hand(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamafactory_macdrop.analysis.evaluate.generate import BatchedGenerator
    from llamafactory_macdrop.analysis.evaluate.tasks import GenerationTask, TaskItem

    folder = build_successor_llama(
        tmp_path,
        [
            ["Ġsky", "Ġblue", "</s>"],
            ["Ġgrass", "Ġgreen", "</s>"],
            ["Ġsnow", "Ġis", "Ġwhite", "</s>"],
            ["Ġnine", "9", "</s>"],
            ["Ġten", "1", "2", "</s>"],
        ],
    )
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    qa = GenerationTask(
        "qa",
        (
            TaskItem("1", ("what is the colour of the sky",), (("Blue",),), "short_qa"),
            TaskItem("2", ("the grass",), (("green is",),), "short_qa"),
            TaskItem("3", ("the snow",), (("white", "snow"),), "short_qa"),
        ),
        10,
        ("\n\n",),
        ("exact_match", "f1"),
        "test",
        "text",
    )
    math_task = GenerationTask(
        "math",
        (TaskItem("a", ("three is nine",), (("9",),), "math"), TaskItem("b", ("seven is ten",), (("10",),), "math")),
        10,
        (),
        ("number_match",),
        "test",
        "text",
    )
    generator = BatchedGenerator(model, tok, batch_size=2)
    for task, want in (
        (qa, {"exact_match": [1, 0, 0], "f1": [1, 2 / 3, 2 / 3]}),
        (math_task, {"number_match": [1, 0]}),
    ):
        results = generator.generate(task.requests())
        per_item = [score_item(task.metrics, item, result) for item, result in zip(task.items, results)]
        for metric, values in want.items():
            assert [s[metric] for s in per_item] == pytest.approx(values)
            assert aggregate(per_item)[metric] == {"mean": pytest.approx(sum(values) / len(values)), "n": len(values)}
    assert [r.text for r in generator.generate(qa.requests())] == [" blue", " green", " is white"]
