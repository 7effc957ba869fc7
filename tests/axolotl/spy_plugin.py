"""A test-only axolotl plugin that watches the planted layer from outside (it imports nothing of
llamafactory-macdrop): ``plugins: [..., spy_plugin.SpyPlugin]`` in the YAML, ``MACDROP_SPY_TRACE``
names the file it writes when training ends.

Per training forward of the planted layer's MLP it records (tests/dist_check.py's Recorder) the
effective W_up/W_gate through their base layers' own forward, and, with axolotl's own reader of the
weights its fused LoRA kernels compute with (``axolotl.kernels.lora.get_lora_parameters``), the W
those kernels would receive and whether it is the very ``base_layer.weight`` tensor. Also the
trainer's log history.
"""

from __future__ import annotations

import os

import torch
from axolotl.integrations.base import BasePlugin
from dist_check import Recorder
from helpers import tiny


class KernelReads(Recorder):
    def __init__(self, path: str) -> None:
        super().__init__({"layer": tiny.PLANTED_LAYER, "indices": list(tiny.PLANTED_INDICES), "expert": None})
        self.path = path
        self.trace["kernel_reads"] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin(model, model)
        (mlp,) = [m for n, m in model.named_modules() if n.endswith(f"layers.{tiny.PLANTED_LAYER}.mlp")]
        from axolotl.kernels.lora import get_lora_parameters

        def read(module, inputs):
            if not module.training:
                return
            seen = {}
            for key, proj in (("up", mlp.up_proj), ("gate", mlp.gate_proj)):
                weight = get_lora_parameters(proj)[0]
                seen[key] = weight.detach().float().cpu().clone()
                seen[key + "_is_base_layer_weight"] = weight is proj.base_layer.weight
            self.trace["kernel_reads"].append((self.step, seen))

        mlp.register_forward_pre_hook(read)

    def on_train_end(self, args, state, control, **kwargs):
        self.trace["log_history"] = list(state.log_history)
        torch.save(self.trace, self.path)


class SpyPlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [KernelReads(os.environ["MACDROP_SPY_TRACE"])]
