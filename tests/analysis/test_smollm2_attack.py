"""A real model: SmolLM2-135M-Instruct under top-k zeroing and retaining (the paper's Table 1 shape)."""

from pathlib import Path

import pytest
from lm_oracle import preferred

from llamafactory_macdrop.analysis.attacks import (
    AttackSetting,
    AttackTargets,
    ModelAttacker,
)
from llamafactory_macdrop.analysis.perplexity import (
    bos_token_id,
    evaluate_perplexity,
    load_text_file,
    make_windows,
    tokenize,
)
from llamafactory_macdrop.analysis.zeroshot import ZeroShotEvaluator, build_task
from llamafactory_macdrop.core.locator import locate_massive_weights

pytestmark = pytest.mark.slow
ENGLISH = Path(__file__).resolve().parents[1] / "data" / "english.txt"


@pytest.fixture(scope="module")
def attacker(smollm2):
    model, _ = smollm2
    located = locate_massive_weights(model, 5)
    assert located.layer == 11
    attacker = ModelAttacker(model, AttackTargets(located.layer, located.indices))
    yield attacker
    attacker.verify_restored()  # the shared model leaves these tests as it came


def test_zeroing_top5_hurts_perplexity_far_more_than_retaining_top5(smollm2, attacker):
    model, tokenizer = smollm2
    source = load_text_file(ENGLISH)  # one window: BOS + the whole text
    windows = make_windows(tokenize(tokenizer, source.text), source.protocol, bos_token_id(model, tokenizer))
    assert windows.count == 1 and 400 < windows.predicted_tokens < 520
    ppl = {}
    for setting in (AttackSetting("none"), AttackSetting("zero", 5), AttackSetting("retain", 5)):
        with attacker.applied(setting):
            ppl[setting.mode] = evaluate_perplexity(model, windows, progress=False).ppl
    assert ppl["none"] < ppl["retain"] < ppl["zero"]
    assert ppl["zero"] > 1.5 * ppl["none"]
    assert ppl["zero"] - ppl["none"] > 3 * (ppl["retain"] - ppl["none"])


def test_packaged_arc_easy_through_lm_eval_matches_the_oracle_under_attack(smollm2, attacker):
    model, tokenizer = smollm2
    limit = 12
    docs = list(build_task("arc_easy").eval_docs)[:limit]
    evaluator = ZeroShotEvaluator(model, tokenizer, ["arc_easy"], limit=limit, batch_size=8)
    for setting in (AttackSetting("none"), AttackSetting("zero", 5)):
        with attacker.applied(setting):
            (result,) = evaluator.evaluate()
            expected = sum(preferred(model, tokenizer, d) == d["choices"]["label"].index(d["answerKey"]) for d in docs)
        assert (result.n, result.split) == (limit, "validation")
        assert result.acc == pytest.approx(expected / limit), setting.label
