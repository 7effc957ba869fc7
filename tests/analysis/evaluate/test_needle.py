"""evaluate/needle.py: prompts of the length asked for as the model is fed them, the needle where
the depth says, deterministic from the seed, refusals in one line; and a planted reader whose
reach is known gives, through the real generation runner, exactly the hand-computed grid."""

import pytest
from helpers import tiny
from helpers.tiny_window import WindowReader

from llamafactory_macdrop.analysis.evaluate.gen_tasks import GenerationSuite
from llamafactory_macdrop.analysis.evaluate.harness import encode_prompt
from llamafactory_macdrop.analysis.evaluate.needle import (
    INSTRUCTION,
    QUESTION,
    NeedleError,
    NeedleSpec,
    default_lengths,
    needle_match,
    parse_depths,
    parse_lengths,
)

LENGTHS, DEPTHS = (256, 512, 1024), (0, 50, 100)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    path.write_text(". ".join(tiny.corpus(400, seed=1)) + ".")
    return str(path)


def encoder(tok):
    return lambda text: encode_prompt(tok, text, chat_template=False)


@pytest.fixture(scope="module")
def task(tok, haystack):
    return NeedleSpec(lengths=LENGTHS, depths=DEPTHS, samples=2, haystack=haystack).build(encoder(tok), tok, 4096)


def test_every_prompt_has_the_length_asked_for_as_the_tokenizer_feeds_it(task, tok):
    assert len(task.items) == len(LENGTHS) * len(DEPTHS) * 2
    for item in task.items:
        fed = tok(item.turns[0])["input_ids"]  # what the tokenizer itself feeds: BOS + the text
        assert fed[0] == tok.bos_token_id
        assert item.meta["length"] - 8 <= len(fed) <= item.meta["length"]
        assert item.meta["prompt_tokens"] == len(fed)


def test_the_needle_sits_where_the_depth_says(task):
    for item in task.items:
        text, key = item.turns[0], item.references[0][0]
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        assert text.count(needle) == 1
        assert text.startswith(INSTRUCTION + "\n\n") and text.endswith("\n\n" + QUESTION)
        body = text[len(INSTRUCTION) + 2 : -len(QUESTION) - 2]
        at = body.index(needle) / (len(body) - len(needle))
        depth = item.meta["depth"]
        if depth == 0:
            assert body.startswith(needle)
        elif depth == 100:
            assert body.endswith(needle)
        else:
            assert abs(at - depth / 100) < 0.1, (item.id, at)


def test_items_are_deterministic_given_the_seed(task, tok, haystack):
    again = NeedleSpec(lengths=LENGTHS, depths=DEPTHS, samples=2, haystack=haystack).build(encoder(tok), tok, 4096)
    assert again.items == task.items
    other = NeedleSpec(lengths=LENGTHS, depths=DEPTHS, samples=2, haystack=haystack, seed=1).build(
        encoder(tok), tok, 4096
    )
    assert [i.references for i in other.items] != [i.references for i in task.items]
    keys = [i.references[0][0] for i in task.items]
    assert all(len(k) == 5 and k.isdigit() for k in keys)
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # the needle's marker sits about (1 - depth) x haystack + the question's 9 tokens from the end:
        # 256: 159 / 115 / 72, 512: 415 / 243 / 72, 1024: 927 / 499 / 72 tokens (depth 0 / 50 / 100)
        (300, {256: [1, 1, 1], 512: [0, 1, 1], 1024: [0, 0, 1]}),
        (10_000, {256: [1, 1, 1], 512: [1, 1, 1], 1024: [1, 1, 1]}),
        (50, {256: [0, 0, 0], 512: [0, 0, 0], 1024: [0, 0, 0]}),
    ],
)
def test_a_reader_with_a_known_reach_gives_the_hand_computed_grid(task, tok, window, expected):
    marker = tok(" pass key is", add_special_tokens=False)["input_ids"]
    reader = WindowReader(len(tok), tok.eos_token_id, marker, window)
    suite = GenerationSuite(reader, tok, [task], batch_size=4, chat_template=False, max_batch_tokens=2048)
    (result,) = suite.evaluate()
    grid = {(c["length"], c["depth"]): c["metrics"]["needle_match"] for c in result.cells}
    assert {length: [grid[(length, d)]["mean"] for d in DEPTHS] for length in LENGTHS} == expected
    assert all(cell["n"] == 2 for cell in grid.values())
    assert result.metrics["needle_match"]["n"] == len(task.items)
    found = [it for it in result.items if it["scores"]["needle_match"] == 1.0]
    assert all(it["outputs"][0].lstrip().startswith(it["references"][0][0]) for it in found)
    assert {"length", "depth", "prompt_tokens"} <= set(result.items[0])


def test_batches_are_capped_in_padded_tokens(task, tok):
    """Long prompts go fewer at a time: no batch above the cap (a single prompt always goes)."""
    marker = tok(" pass key is", add_special_tokens=False)["input_ids"]
    reader = WindowReader(len(tok), tok.eos_token_id, marker, 300)
    seen = []
    generate = reader.generate

    def spy(input_ids, attention_mask, **kw):
        seen.append(input_ids.shape)
        return generate(input_ids, attention_mask, **kw)

    reader.generate = spy
    suite = GenerationSuite(reader, tok, [task], batch_size=8, chat_template=False, max_batch_tokens=2000)
    suite.evaluate()
    assert sum(rows for rows, _ in seen) == len(task.items)
    assert max(rows for rows, _ in seen) == 1  # the longest length, 1024 + 16 tokens: two would exceed 2000
    assert suite.protocol()["tasks"][0]["batch_size"] == 1


def test_the_score_is_the_first_number_said():
    assert needle_match("The pass key is 48213.", ["48213"]) == 1.0
    assert needle_match(" 48213 is it", ["48213"]) == 1.0
    assert needle_match("It is 11111, or 48213", ["48213"]) == 0.0
    assert needle_match("I do not know", ["48213"]) == 0.0
    assert needle_match("482130", ["48213"]) == 0.0


def test_options_are_refused_in_one_line(tok, haystack):
    with pytest.raises(NeedleError, match=r"--needle-depths '0,abc': 'abc' is not an integer"):
        parse_depths("0,abc")
    with pytest.raises(NeedleError, match=r"--needle-depths '0,150': 150 is not allowed"):
        parse_depths("0,150")
    with pytest.raises(NeedleError, match=r"--needle-lengths '0': 0 is not allowed"):
        parse_lengths("0")
    with pytest.raises(NeedleError, match=r"--needle-samples 0 is not allowed"):
        NeedleSpec(samples=0)
    with pytest.raises(NeedleError, match=r"--needle-lengths 4096 is longer than the model's max_position_embeddings"):
        NeedleSpec(lengths=(1024, 4096)).check({"max_position_embeddings": 2048})
    with pytest.raises(NeedleError, match=r"less the 16-token answer: allowed 1..2032"):  # L + answer must fit
        NeedleSpec(lengths=(2048,)).check({"max_position_embeddings": 2048})
    with pytest.raises(NeedleError, match=r"less the 16-token answer: allowed 1..1008"):  # GPT-2's n_positions
        NeedleSpec(lengths=(1024,)).check({"n_positions": 1024})
    with pytest.raises(NeedleError, match=r"--needle-lengths 64 is too short"):  # before the model: the tokenizer
        NeedleSpec(lengths=(64, 1024), haystack=haystack).check({"max_position_embeddings": 4096}, encoder(tok))
    with pytest.raises(NeedleError, match=r"--needle-lengths 64 is too short: .* take \d+ tokens as fed"):
        NeedleSpec(lengths=(64,), haystack=haystack).build(encoder(tok), tok, 4096)
    with pytest.raises(NeedleError, match=r"--needle-haystack .*: no such file"):
        NeedleSpec(haystack="/nonexistent/hay.txt").check({"max_position_embeddings": 2048})
    with pytest.raises(NeedleError, match=r"no max_position_embeddings: give --needle-lengths or --max-length"):
        NeedleSpec().check({})


def test_default_lengths_double_up_to_the_model_positions():
    assert default_lengths(8192) == (512, 1024, 2048, 4096, 8192)
    assert default_lengths(7500) == (512, 1024, 2048, 4096, 7500)
    assert NeedleSpec().resolved_lengths(2048) == (512, 1024, 2032)  # 2048 positions less the 16-token answer
    assert NeedleSpec(max_length=1024).resolved_lengths(8192) == (512, 1024)


def test_the_needle_never_splits_a_word_with_a_sentencepiece_tokenizer():
    """SentencePiece decodes one token without its space, so a word start is read from the piece."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from llamafactory_macdrop.analysis.evaluate.needle import _word_start

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(tiny.corpus(200), vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    ids = tok(" ".join(tiny.corpus(20, seed=3)), add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert sum(not p.startswith("▁") for p in pieces) > len(pieces) // 4  # words really are split
    for at in range(1, len(ids)):
        pos = _word_start(tok, ids, at)
        assert pos <= at
        assert pieces[pos].startswith("▁"), (at, pos, pieces[pos])
