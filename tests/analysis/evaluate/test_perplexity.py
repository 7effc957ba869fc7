"""perplexity.py: windows per protocol, and perplexity against HF's own loss as the oracle."""

import math

import pytest
import torch
from helpers import tiny

from llamafactory_macdrop.analysis.evaluate.perplexity import (
    CORPORA,
    PerplexityError,
    PerplexityProtocol,
    evaluate_perplexity,
    load_corpus,
    load_text_file,
    make_windows,
)


def test_windows_follow_the_bos_policy_and_limits():
    stream = torch.arange(10, 33)  # 23 tokens
    w = make_windows(stream, PerplexityProtocol(seq_len=5, bos="none"))
    assert w.full.tolist() == [list(range(10 + 5 * i, 15 + 5 * i)) for i in range(4)]
    assert w.tail is None
    assert w.predicted_tokens == 4 * 4
    assert w.full.data_ptr() == stream.data_ptr()  # a view: nothing copied per window

    w = make_windows(stream, PerplexityProtocol(seq_len=5, bos="stream", drop_partial=False), prefix=[1])
    assert w.full[0].tolist() == [1, 10, 11, 12, 13]
    assert w.full[1, 0] == 14  # one BOS, then the stream
    assert w.tail.tolist() == [[29, 30, 31, 32]]
    assert w.count == 5
    assert w.predicted_tokens == 4 * 4 + 3

    w = make_windows(stream, PerplexityProtocol(seq_len=5, bos="window", max_windows=2, drop_partial=False), prefix=[1])
    assert w.full.tolist() == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17]]
    assert w.tail is None  # limit reached

    w = make_windows(stream[:3], PerplexityProtocol(seq_len=8, bos="none", drop_partial=False))
    assert w.full.shape == (0, 8)
    assert w.tail.tolist() == [[10, 11, 12]]
    with pytest.raises(PerplexityError, match="fewer than one window of 8"):
        make_windows(stream[:3], PerplexityProtocol(seq_len=8))
    with pytest.raises(PerplexityError, match="--bos window needs a token to put first"):
        make_windows(stream, PerplexityProtocol(bos="window"))

    w = make_windows(stream, PerplexityProtocol(seq_len=6, bos="window", max_windows=2), prefix=[1, 2])  # 2 tokens
    assert w.full.tolist() == [[1, 2, 10, 11, 12, 13], [1, 2, 14, 15, 16, 17]]


def test_sun_et_al_defaults_are_the_documented_ones():
    # where the TOKENIZER's BOS goes (Sun et al. encode wikitext without special tokens, C4/PG-19 with)
    assert CORPORA["wikitext"].protocol == PerplexityProtocol(seq_len=4096, corpus_bos="none", max_windows=None)
    assert (CORPORA["wikitext"].path, CORPORA["wikitext"].config, CORPORA["wikitext"].split) == (
        "wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    for name in ("c4", "pg19"):
        assert CORPORA[name].protocol.max_windows == 100
        assert CORPORA[name].protocol.corpus_bos == "stream"
        assert CORPORA[name].protocol.bos is None  # nothing asked: follow the tokenizer
    assert CORPORA["pg19"].max_docs == 5
    assert CORPORA["c4"].max_docs == 5000


def test_perplexity_matches_the_models_own_loss(tiny_llama):
    model = tiny_llama.eval()
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(4, 300, (150,), generator=g)
    windows = make_windows(stream, PerplexityProtocol(seq_len=32, bos="stream", drop_partial=False), prefix=[1])
    total, count, per_window = 0.0, 0, []
    with torch.no_grad():
        for row in list(windows.full) + [windows.tail[0]]:
            loss = model(input_ids=row[None], labels=row[None]).loss  # HF: mean over len - 1 predictions
            per_window.append((float(loss) * (row.numel() - 1), row.numel() - 1))
            total += per_window[-1][0]
            count += row.numel() - 1
    result = evaluate_perplexity(model, windows, progress=False)
    # BOS + 150 tokens = 4 windows of 32 + a tail of 23; each window's first token is context only
    assert windows.count == 5
    assert result.tokens == count == 151 - 5
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    batched = evaluate_perplexity(model, windows, batch_size=3, progress=False)
    assert batched.ppl == pytest.approx(result.ppl, rel=1e-5)
    # per window (macdrop compare's bootstrap items): each window's summed NLL and its predictions
    itemised = evaluate_perplexity(model, windows, batch_size=3, progress=False, per_window=True)
    assert itemised.window_tokens == tuple(n for _, n in per_window)
    assert itemised.window_nll == pytest.approx([s for s, _ in per_window], rel=1e-5)
    assert itemised.ppl == pytest.approx(result.ppl, rel=1e-6)
    assert result.window_nll is None
    assert model.training is False


def test_text_files_and_local_dataset_folders(tmp_path):
    import datasets

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(PerplexityError, match=r"--text-file .*empty.txt is empty"):
        load_text_file(empty)
    src = tmp_path / "a.txt"
    src.write_text("hello world")
    assert load_text_file(src, {"seq_len": 64}).protocol == PerplexityProtocol(
        seq_len=64, corpus_bos="stream", drop_partial=False
    )

    texts = tiny.corpus(8)
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict({"text": texts}),
            "train": datasets.Dataset.from_dict({"text": ["not this"]}),
        }
    ).save_to_disk(tmp_path / "wiki")
    local = load_corpus(f"wikitext={tmp_path / 'wiki'}")
    assert local.text == "\n\n".join(texts)  # the test split, joined as Sun et al. join wikitext
    assert local.protocol == CORPORA["wikitext"].protocol
    assert "(local)" in local.origin
    plain = load_corpus(str(tmp_path / "wiki"))
    assert plain.name == "wiki"
    assert plain.protocol.corpus_bos == "stream"
    assert plain.protocol.bos is None
    with pytest.raises(
        PerplexityError, match=r"--dataset 'wikitext103' is not allowed: choose from wikitext, c4, pg19"
    ):
        load_corpus("wikitext103")
