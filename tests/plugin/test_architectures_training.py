"""MacDrop through LLaMA-Factory's run_exp on the non-Llama layouts: the located rows of the
right matrices (chosen expert, fused halves, Conv1D columns) are masked during training steps,
and every pre-trained weight is bit-identical afterwards."""

import json

import pytest
import torch
from helpers import tiny
from helpers import tiny_archs as ta
from safetensors.torch import load_file
from transformers import TrainerCallback

from llamafactory_macdrop.plugin import integration

LORA_TARGET = {"gpt2": "c_attn", "opt": "q_proj,v_proj"}
# transformers 5 fuses MoE experts in memory but saves them per expert, under these names
LEGACY_EXPERTS = {
    "mixtral": (
        "block_sparse_moe.experts.{e}.w1.weight",
        "block_sparse_moe.experts.{e}.w3.weight",
        "block_sparse_moe.experts.{e}.w2.weight",
    ),
    "qwen2_moe": (
        "mlp.experts.{e}.gate_proj.weight",
        "mlp.experts.{e}.up_proj.weight",
        "mlp.experts.{e}.down_proj.weight",
    ),
}


def fuse_legacy_experts(name, originals, num_experts=4):
    """Checkpoint tensors under the in-memory names of fused experts (gate_up = [gate; up])."""
    if name not in LEGACY_EXPERTS:
        return originals
    gate, up, down = LEGACY_EXPERTS[name]
    out = {k: v for k, v in originals.items() if ".experts." not in k}
    for layer in range(ta.LAYERS):
        pre = f"model.layers.{layer}."
        experts = range(num_experts)
        out[pre + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([originals[pre + gate.format(e=e)], originals[pre + up.format(e=e)]]) for e in experts]
        )
        out[pre + "mlp.experts.down_proj"] = torch.stack([originals[pre + down.format(e=e)] for e in experts])
    return {k.replace("block_sparse_moe.gate.", "mlp.gate."): v for k, v in out.items()}


#: layout -> (parameter name under decoder layer 1, [(label, row offset, axis)]): where the planted
#: units' gate/up rows live, written out by hand from transformers' module definitions (the oracle
#: does not ask the plugin's architecture code)
PLANTED_ROWS = {
    "mixtral": ("mlp.experts.gate_up_proj", [("gate", 0, 0), ("up", ta.I, 0)]),
    "qwen2_moe": ("mlp.experts.gate_up_proj", [("gate", 0, 0), ("up", ta.I, 0)]),
    "phi3": ("mlp.gate_up_proj.weight", [("gate", 0, 0), ("up", ta.I, 0)]),
    "gpt2": ("mlp.c_fc.weight", [("up", 0, 1)]),  # Conv1D stores [in, out]: the units are columns
    "opt": ("fc1.weight", [("up", 0, 0)]),
}


def _planted_param(model, name):
    """The frozen weight ``name`` of decoder layer 1 (peft keeps it under ``base_layer``)."""
    wanted = {f"layers.{ta.PLANTED_LAYER}.{name}", f"h.{ta.PLANTED_LAYER}.{name}"}
    for full, param in model.named_parameters():
        short = full.replace(".base_layer.", ".")
        if any(short.endswith(w) for w in wanted):
            return param
    raise AssertionError(f"no parameter *{name} in layer {ta.PLANTED_LAYER}")


class RowWatcher(TrainerCallback):
    """Reads the planted rows straight from the parameters at every training forward of layer 1."""

    def __init__(self, name):
        self.name = name

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.seen = model, []
        param_name, self.parts = PLANTED_ROWS[self.name]
        self.param = _planted_param(model, param_name)
        self.originals = self.rows()
        layer = next(
            m for n, m in model.named_modules() if n.endswith((f"layers.{ta.PLANTED_LAYER}", f"h.{ta.PLANTED_LAYER}"))
        )
        layer.register_forward_pre_hook(self.hook)

    def rows(self):
        w = self.param.detach()
        if w.dim() == 3:  # fused experts: the planted expert's matrix
            w = w[ta.PLANTED_EXPERT]
        idx = torch.tensor(ta.PLANTED_INDICES)
        return [
            (w.index_select(axis, idx + offset) if axis == 0 else w.index_select(1, idx).t()).clone()
            for _, offset, axis in self.parts
        ]

    def hook(self, module, args):
        if self.model.training:
            rows = self.rows()
            zeroed = [(r == 0) & (o != 0) for r, o in zip(rows, self.originals)]
            self.seen.append((zeroed[0].float().mean().item(), all(torch.equal(zeroed[0], z) for z in zeroed)))


def _bits(t):
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "phi3", "gpt2", "opt"])
def test_training_masks_the_located_rows_and_restores_everything(name, tiny_data_dir, tmp_path):
    model_dir = ta.save_with_tokenizer(name, tmp_path / "model")
    originals = {}
    for f in model_dir.glob("*.safetensors"):
        originals.update(load_file(f))
    originals = fuse_legacy_experts(name, originals)
    out = tmp_path / "out"
    args = tiny.lf_train_args(
        model_dir,
        tiny_data_dir,
        out,
        lora_target=LORA_TARGET.get(name, "all"),
        cutoff_len=32,
        gradient_accumulation_steps=1,
        max_steps=4,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
    )
    watcher = RowWatcher(name)
    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=[watcher])

    located = json.loads((out / "macdrop_locator.json").read_text())
    # the probe token is the training data's first token ("H"), which on some of these random
    # models (Phi-3) carries a weaker massive activation through the same planted rows: the same
    # layer and rows, ranked in another order than BOS ranks them
    assert (located["layer"], sorted(located["indices"])) == (ta.PLANTED_LAYER, sorted(ta.PLANTED_INDICES))
    assert located["expert"] == (ta.PLANTED_EXPERT if "moe" in name or name == "mixtral" else None)
    assert watcher.seen
    assert all(same for _, same in watcher.seen)  # one mask for gate and up
    assert all(0.3 < frac < 0.7 for frac, _ in watcher.seen), watcher.seen  # p = 0.5

    base = watcher.model.get_base_model()
    compared = set()
    for key, value in base.state_dict().items():
        ckpt = key.replace(".base_layer.", ".")
        if "lora_" not in key and ckpt in originals:
            assert torch.equal(_bits(value), _bits(originals[ckpt])), ckpt
            compared.add(ckpt)
    assert compared == set(originals) - {"lm_head.weight"} or compared == set(originals)
    assert all(m in compared or m + ".weight" in compared for m in located["modules"]), located["modules"]
