"""``macdrop compare``'s evaluation: adapters on one base, attacks seen UNDER each adapter.

The planted model gets a spare FFN unit (its gate/up rows and down column zeroed: it writes
nothing), and a hand-made LoRA adapter copies the top massive unit into it (gate and up rows,
down column). By construction, with that adapter the model under "zero k=1" (the top row of the
BASE zeroed) computes exactly what the plain base computes: the copy carries the unit. So the
evaluation must report base-clean perplexity for adapter + zero k=1, while the base alone loses
under the same attack. Perplexities are checked against HF's own loss on hand-attacked copies.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.tiny import PLANTED_INDICES, PLANTED_LAYER, build_planted_llama, corpus

from llamafactory_macdrop.analysis.attack.attacks import AttackSetting, AttackTargets
from llamafactory_macdrop.analysis.compare.evaluation import OneBaseEvaluator, fingerprint
from llamafactory_macdrop.analysis.evaluate.perplexity import PerplexityProtocol, TextSource, make_windows, tokenize
from llamafactory_macdrop.analysis.sweep.loop import PreparedCorpus

TOP, SPARE = PLANTED_INDICES[0], 3


@pytest.fixture(scope="module")
def planted_with_spare(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("spare")
    base_dir = build_planted_llama(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    mlp = model.model.layers[PLANTED_LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[SPARE] = 0
        mlp.up_proj.weight[SPARE] = 0
        mlp.down_proj.weight[:, SPARE] = 0
    model.save_pretrained(base_dir)
    return base_dir, root


@pytest.fixture(scope="module")
def copying_adapter(planted_with_spare):
    """LoRA r=1, scale 1: gate/up row SPARE += row TOP, down column SPARE += column TOP."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir, root = planted_with_spare
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    mlp = model.model.layers[PLANTED_LAYER].mlp
    rows = {n: getattr(mlp, n).weight[TOP].clone() for n in ("gate_proj", "up_proj")}
    col = mlp.down_proj.weight[:, TOP].clone()
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=1,
            lora_alpha=1,
            lora_dropout=0.0,
            layers_to_transform=[PLANTED_LAYER],
            target_modules=["gate_proj", "up_proj", "down_proj"],
        ),
    )
    layer = peft_model.base_model.model.model.layers[PLANTED_LAYER].mlp
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            mod = getattr(layer, name)
            mod.lora_A["default"].weight.copy_(rows[name].view(1, -1))
            mod.lora_B["default"].weight.zero_()
            mod.lora_B["default"].weight[SPARE, 0] = 1.0
        mod = layer.down_proj
        mod.lora_A["default"].weight.zero_()
        mod.lora_A["default"].weight[0, SPARE] = 1.0
        mod.lora_B["default"].weight.copy_(col.view(-1, 1))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(root / "adapter")
    return root / "adapter"


def _hf_ppl(model, windows) -> float:
    """Independent perplexity: HF's own mean loss per window, weighted by predicted tokens."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for w in windows:
            loss = model(input_ids=w.view(1, -1), labels=w.view(1, -1)).loss
            total += float(loss) * (w.numel() - 1)
            tokens += w.numel() - 1
    return math.exp(total / tokens)


def _zero_top(model):
    mlp = model.model.layers[PLANTED_LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[TOP] = 0
        mlp.up_proj.weight[TOP] = 0
    return model


def test_attacks_are_seen_under_each_adapter(planted_with_spare, copying_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, _ = planted_with_spare
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    source = TextSource(
        "planted.txt",
        " ".join(corpus(60, seed=9)),
        "test",
        PerplexityProtocol(seq_len=24, bos="stream", drop_partial=True),
    )
    windows = make_windows(tokenize(tokenizer, source.text), source.protocol, tokenizer.bos_token_id)
    before = fingerprint(model)
    evaluator = OneBaseEvaluator(
        model,
        str(base_dir),
        AttackTargets(PLANTED_LAYER, [TOP]),
        [AttackSetting("clean"), AttackSetting("zero", 1)],
        [PreparedCorpus(source, windows)],
        progress=False,
        echo=None,
    )
    base = evaluator.evaluate(None, "base")
    adapted = evaluator.evaluate(copying_adapter, "copy")
    again = evaluator.evaluate(None, "base again")
    evaluator.verify_base()

    from llamafactory_macdrop.analysis.compare.paired import metric_value

    value = {
        (label, m): metric_value(items)
        for label, got in (("base", base), ("copy", adapted), ("again", again))
        for m, items in got.items()
    }
    clean, zero = "ppl/planted.txt/clean", "ppl/planted.txt/zero k=1"
    # independent numbers: HF's loss on the base, on a hand-attacked copy, and with the adapter by peft
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert value[("base", clean)] == pytest.approx(_hf_ppl(fresh, windows.full), rel=1e-5)
    assert value[("base", zero)] == pytest.approx(_hf_ppl(_zero_top(copy.deepcopy(fresh)), windows.full), rel=1e-5)
    with_adapter = PeftModel.from_pretrained(_zero_top(copy.deepcopy(fresh)), str(copying_adapter)).eval()
    assert value[("copy", zero)] == pytest.approx(_hf_ppl(with_adapter, windows.full), rel=1e-5)

    # the point: under the attack the adapter's copy carries the unit, so it scores as the clean base ...
    assert value[("copy", zero)] == pytest.approx(value[("base", clean)], rel=1e-5)
    # ... while the base alone loses under the same attack, and the adapter does change the clean model
    assert abs(value[("base", zero)] / value[("base", clean)] - 1) > 1e-4
    assert abs(value[("copy", clean)] / value[("base", clean)] - 1) > 1e-4
    # the adapter came off again: same numbers as before it, every base tensor bit for bit
    assert value[("again", clean)] == value[("base", clean)]
    assert value[("again", zero)] == value[("base", zero)]
    assert fingerprint(evaluator.base) == before
    assert not any("lora" in n for n, _ in evaluator.base.named_parameters())


def test_adapters_that_cannot_come_off_are_refused_and_the_cache_follows_the_adapter(
    planted_with_spare, copying_adapter, tmp_path
):
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from llamafactory_macdrop.analysis.compare.runs import CompareError

    base_dir, _ = planted_with_spare
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    evaluator = OneBaseEvaluator(
        model,
        str(base_dir),
        AttackTargets(PLANTED_LAYER, [TOP]),
        [AttackSetting("clean")],
        progress=False,
        echo=None,
        protocol={"p": 1},
    )
    # an adapter that carries a trained copy of a base module (modules_to_save): unload would keep it
    odd = tmp_path / "odd"
    shutil.copytree(copying_adapter, odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(CompareError, match="modules_to_save"):
        evaluator.evaluate(odd, "odd")
    # the cache key follows the adapter's bytes (a run retrained into the same folder) and the protocol
    again = tmp_path / "again"
    shutil.copytree(copying_adapter, again)
    key = evaluator.cache_key(again)
    assert evaluator.cache_key(again) == key
    weights = again / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert evaluator.cache_key(again) != key
    evaluator.protocol = {"p": 2}
    assert evaluator.cache_key(None) != OneBaseEvaluator(
        model, str(base_dir), AttackTargets(PLANTED_LAYER, [TOP]), [], progress=False, echo=None, protocol={"p": 1}
    ).cache_key(None)
