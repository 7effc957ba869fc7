"""evaluate/generate.py: batched greedy decoding gives, token for token, what each prompt gives
alone (an independent no-cache arg-max loop and attack --generate's greedy_generate); stop
strings, budgets and end tokens end each row; chat template and conversations; known answers."""

import pytest
import torch
from helpers import tiny, tiny_archs
from helpers.lm_oracle import argmax_loop
from helpers.tiny_answers import build_successor_llama

from llamafactory_macdrop.analysis.attack.generation import end_tokens, greedy_generate
from llamafactory_macdrop.analysis.evaluate.generate import (
    BatchedGenerator,
    GenerationError,
    GenerationRequest,
    encode_conversation,
)

PROMPTS = [" ".join(text.split()[:n]) for text, n in zip(tiny.corpus(7, seed=5), [1, 9, 3, 5, 12, 2, 7])]
BUDGETS = [6, 14, 3, 10, 8, 12, 1]


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return tiny.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def answers_dir(tmp_path_factory):
    chains = [
        ["Ġsky", "Ġblue", "</s>"],
        ["Ġgrass", "Ġgreen", "</s>"],
        ["Ġsnow", "Ġis", "Ġwhite", "</s>"],
        ["Ġnine", "9", "</s>"],
        ["Ġten", "1", "2", "</s>"],
        ["Ġcoal", "Ġblack", "Ġcoal"],
    ]
    return build_successor_llama(tmp_path_factory.mktemp("answers"), chains)


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _requests(prompts=PROMPTS, budgets=BUDGETS):
    return [GenerationRequest(str(i), (p,), m) for i, (p, m) in enumerate(zip(prompts, budgets))]


@pytest.mark.parametrize("arch", ["planted_llama", "qwen2", "gpt2", "opt", "gemma3"])
def test_batched_equals_one_by_one(arch, tiny_llama_dir, plain_tok):
    if arch == "planted_llama":
        model, tok = _load(tiny_llama_dir)
    else:  # random weights; gpt2's and opt's learned positions show any position-id error at once, gemma3 has
        # sliding-window layers
        model, tok = tiny_archs.build(arch, vocab=len(plain_tok)), plain_tok
    requests = _requests()
    results = BatchedGenerator(model, tok, batch_size=3).generate(requests)
    eos = tok.eos_token_id
    assert end_tokens(model, tok) == {eos}
    lengths = set()
    for request, result in zip(requests, results):
        ids = tok(request.turns[0])["input_ids"]  # the tokenizer's own encoding: BOS + text
        lengths.add(len(ids))
        want = argmax_loop(model, ids, request.max_new_tokens, eos)
        assert list(result.turns[0].token_ids) == want, request.id
        if arch == "planted_llama":  # and attack --generate's own loop
            assert list(result.turns[0].token_ids) == greedy_generate(model, ids, request.max_new_tokens, {eos})[0]
        assert result.turns[0].prompt_tokens == len(ids) and result.chat_template is False
        assert result.text == tok.decode([t for t in want if t != eos], skip_special_tokens=True)
    assert len(lengths) >= 5  # mixed lengths: the batches are padded


def test_dropping_finished_rows_or_keeping_them_gives_the_same(tiny_llama_dir):
    model, tok = _load(tiny_llama_dir)
    pruned = BatchedGenerator(model, tok, batch_size=7).generate(_requests())
    kept = BatchedGenerator(model, tok, batch_size=7, prune=False).generate(_requests())
    assert [r.turns[0].token_ids for r in pruned] == [r.turns[0].token_ids for r in kept]
    assert [len(r.turns[0].token_ids) for r in pruned] == BUDGETS  # this model never says </s> here


def test_known_answers_end_tokens_and_stop_strings(answers_dir):
    model, tok = _load(answers_dir)
    eos = tok.eos_token_id
    blue, white, is_ = tok.convert_tokens_to_ids(["Ġblue", "Ġwhite", "Ġis"])
    requests = [
        GenerationRequest("sky", ("what is the colour of the sky",), 10),
        GenerationRequest("snow", ("the snow",), 10),
        GenerationRequest("snow-stop", ("the snow",), 10, stop=(" white",)),
        GenerationRequest("snow-across", ("the snow",), 10, stop=("s w", "zzz")),  # spans two tokens
        GenerationRequest("ten", ("ten and twelve minus three is ten",), 10),
        GenerationRequest("coal", ("black coal",), 5),  # coal -> black -> coal ...: the budget ends it
        GenerationRequest(
            "coal-first", ("black coal",), 5, stop=("k c", " black c")
        ),  # both at once: the earliest wins
    ]
    results = {r.id: r.turns[0] for r in BatchedGenerator(model, tok, batch_size=4).generate(requests)}
    assert (results["sky"].text, results["sky"].token_ids, results["sky"].stopped) == (" blue", (blue, eos), "eos")
    assert (results["snow"].text, results["snow"].stopped) == (" is white", "eos")
    assert results["snow-stop"].text == " is" and results["snow-stop"].token_ids == (is_, white)
    assert (results["snow-stop"].stopped, results["snow-stop"].stop_string) == ("stop", " white")
    assert results["snow-across"].text == " i" and results["snow-across"].stop_string == "s w"
    assert results["ten"].text == "12"
    assert (results["coal"].text, results["coal"].stopped) == (" black coal black coal black", "max_new_tokens")
    assert (results["coal-first"].text, results["coal-first"].stop_string) == ("", " black c")


def test_chat_template_and_conversations_turn_by_turn(tmp_path):
    folder = tiny_archs.save_chatml_model(tmp_path / "chatml")
    model, tok = _load(folder)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    requests = [
        GenerationRequest("a", ("the quick brown fox", "and the lazy dog"), 6),
        GenerationRequest("b", ("seven small birds",), 4),
        GenerationRequest("c", ("blue", "green grass", "white snow"), 5, stop=("zz",)),
    ]
    results = BatchedGenerator(model, tok, batch_size=2).generate(requests)
    assert all(r.chat_template for r in results)
    for request, result in zip(requests, results):
        messages = []
        assert len(result.turns) == len(request.turns)
        for turn, out in zip(request.turns, result.turns):
            messages.append({"role": "user", "content": turn})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            want = argmax_loop(model, ids, request.max_new_tokens, eos)
            assert list(out.token_ids) == want and out.prompt_tokens == len(ids)
            answer = tok.decode([t for t in want if t != eos], skip_special_tokens=True)
            assert out.text == answer
            messages.append({"role": "assistant", "content": answer})
    # one turn under the template: the ids attack --generate feeds
    from llamafactory_macdrop.analysis.attack.generation import prompt_ids

    assert encode_conversation(tok, ["blue"]) == prompt_ids(tok, "blue")


def test_without_a_chat_template_the_text_follows_the_tokenizers_prefix(plain_tok):
    ids, templated = encode_conversation(plain_tok, ["the sky"])
    assert (ids, templated) == (plain_tok("the sky")["input_ids"], False) and ids[0] == plain_tok.bos_token_id
    ids, _ = encode_conversation(plain_tok, ["the sky", "grass"], [" is blue"], system="be brief")
    assert ids == plain_tok("be brief\n\nthe sky is blue\n\ngrass")["input_ids"]


def test_progress_and_bad_requests(tiny_llama_dir):
    model, tok = _load(tiny_llama_dir)
    seen = []
    BatchedGenerator(model, tok, batch_size=3).generate(_requests(), progress=seen.append)
    assert [p.done for p in seen] == [3, 6, 7] and {p.total for p in seen} == {7}
    assert seen[-1].new_tokens == sum(BUDGETS) and seen[-1].tokens_per_s > 0 and "prompts/s" in seen[-1].line()
    with pytest.raises(GenerationError, match="max_new_tokens 0"):
        GenerationRequest("x", ("a",), 0)
    with pytest.raises(GenerationError, match="turns"):
        GenerationRequest("x", (), 3)
    with pytest.raises(GenerationError, match="batch_size"):
        BatchedGenerator(model, tok, batch_size=0)
    assert model.training is False
    model.train()
    BatchedGenerator(model, tok).generate(_requests()[:1])
    assert model.training is True  # the flag comes back
    assert torch.is_grad_enabled()
