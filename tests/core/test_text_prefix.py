"""What goes before a text: the tokenizer's own prefix, measured from its encodings, and the
explicit deviations (core/text_prefix.py). The expected ids come from the tokenizers themselves
(their own encodings with and without special tokens), never from the module."""

from dataclasses import replace

import pytest
from helpers import tiny

from llamafactory_macdrop.analysis.evaluate.perplexity import CORPORA, TEXT_FILE_PROTOCOL, resolve_protocol
from llamafactory_macdrop.core.text_prefix import PrefixError, config_bos_token_id, resolve_prefix, tokenizer_prefix


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):  # adds BOS, like a Llama tokenizer
    return tiny.build_tokenizer(tmp_path_factory.mktemp("llama_tok"))


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):  # adds nothing, like a Qwen tokenizer
    return tiny.build_chatml_tokenizer(tmp_path_factory.mktemp("chatml_tok"))


def test_the_prefix_is_what_the_tokenizer_itself_puts_before_a_text(llama_tok, chatml_tok):
    text = "the quick brown fox"
    with_special, plain = llama_tok(text)["input_ids"], llama_tok(text, add_special_tokens=False)["input_ids"]
    assert with_special == [llama_tok.bos_token_id] + plain  # what the tokenizer does ...
    assert tokenizer_prefix(llama_tok) == (llama_tok.bos_token_id,)  # ... is the prefix
    assert chatml_tok(text)["input_ids"] == chatml_tok(text, add_special_tokens=False)["input_ids"]
    assert tokenizer_prefix(chatml_tok) == ()
    assert tokenizer_prefix(None) == ()


def test_an_appended_eos_is_not_a_prefix(tmp_path):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = tiny.build_tokenizer(tmp_path)
    backend = base.backend_tokenizer
    eos = base.eos_token_id
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert tok("the fox")["input_ids"][-1] == eos  # it appends EOS, puts nothing first
    assert tokenizer_prefix(tok) == ()


def test_explicit_choices_and_refusals(llama_tok, chatml_tok):
    own = resolve_prefix(llama_tok)
    assert own.token_ids == (llama_tok.bos_token_id,)
    assert own.source == "tokenizer"
    assert own.tokenizer_adds_bos
    assert own.protocol()["prefix_token"] == "<s>"
    assert "(the tokenizer adds it)" in own.describe()
    none = resolve_prefix(llama_tok, "none")
    assert none.token_ids == ()
    assert none.tokenizer_adds_bos
    assert "the tokenizer would add" in none.describe()

    plain = resolve_prefix(chatml_tok, config_bos=0)
    assert plain.token_ids == ()
    assert not plain.tokenizer_adds_bos
    assert plain.protocol()["config_bos_token_id"] == 0
    assert "config bos_token_id 0 '<|endoftext|>' is not put first" in plain.describe()
    with pytest.raises(PrefixError) as err:
        resolve_prefix(chatml_tok, "stream", config_bos=0)
    message = str(err.value)
    assert message.startswith("--bos stream: this tokenizer adds no BOS")
    assert "bos_token_id 0 '<|endoftext|>'" in message
    assert "--bos-token ID|TEXT" in message
    assert "\n" not in message

    by_text = resolve_prefix(chatml_tok, "stream", "<|endoftext|>", vocab_size=len(chatml_tok))
    by_id = resolve_prefix(chatml_tok, None, 0, vocab_size=len(chatml_tok))
    assert by_text.token_ids == by_id.token_ids == (0,)
    assert by_text.source == "--bos-token"
    assert by_id.protocol()["tokenizer_adds_bos"] is False
    assert "the tokenizer itself adds none" in by_id.describe()
    for bad, fragment in ((10**6, "a token id is in 0.."), ("the quick brown", "tokens"), ("", "is not allowed")):
        with pytest.raises(PrefixError, match=fragment):
            resolve_prefix(chatml_tok, None, bad, vocab_size=len(chatml_tok))
    with pytest.raises(PrefixError, match="with --bos none"):
        resolve_prefix(chatml_tok, "none", 0)


def test_corpus_placements_follow_the_tokenizer(llama_tok, chatml_tok):
    bos = llama_tok.bos_token_id
    protocol, prefix = resolve_protocol(TEXT_FILE_PROTOCOL, llama_tok)
    assert (protocol.bos, prefix.token_ids) == ("stream", (bos,))  # Sun et al.'s C4/PG-19: once before the stream
    protocol, prefix = resolve_protocol(CORPORA["wikitext"].protocol, llama_tok)
    assert (protocol.bos, prefix.token_ids, prefix.tokenizer_adds_bos) == ("none", (), True)  # their wikitext: none
    protocol, prefix = resolve_protocol(replace(TEXT_FILE_PROTOCOL, bos="window"), llama_tok)
    assert (protocol.bos, prefix.token_ids) == ("window", (bos,))
    protocol, prefix = resolve_protocol(TEXT_FILE_PROTOCOL, chatml_tok, config_bos=0)
    assert (protocol.bos, prefix.token_ids) == ("none", ())  # nothing the tokenizer would not add
    protocol, prefix = resolve_protocol(replace(CORPORA["wikitext"].protocol, bos_token=0), chatml_tok)
    assert (protocol.bos, prefix.token_ids) == ("stream", (0,))  # --bos-token alone: once, before the stream


def test_config_bos_is_read_from_objects_dicts_and_text_configs():
    class Config:
        bos_token_id = [7, 8]

    assert config_bos_token_id(Config()) == 7
    assert config_bos_token_id({"text_config": {"bos_token_id": 3}}) == 3
    assert config_bos_token_id({"bos_token_id": None}) is None
