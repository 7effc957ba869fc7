"""Locate massive weights in a checkpoint too big for memory: one decoder layer at a time.

Locating needs a single-token forward pass through the layers up to the origin of the massive
activation, nothing more. So the model is built with its parameters on the ``meta`` device
(``accelerate.init_empty_weights``: buffers such as rotary frequencies stay real), the
embeddings and other non-layer parameters (not the output head, which the probe never reaches)
are read from the safetensors shards, and each decoder layer's parameters are read right before
it runs and dropped right after (``safe_open`` maps the shards, so only the tensors asked for
are read). The pass uses the locator's one rule (:func:`.locator.find_origin`: the first layer
whose residual becomes massive and stays so) and stops as soon as that rule has decided, i.e.
:data:`.locator.PERSIST_LAYERS` layers after the origin; the rule never looks further, so the
answer is the full load's. Candidate probe tokens are tried in order until one has a massive
activation (a candidate without one is read to the last layer). The head is never needed.

Peak memory ~ non-layer parameters (embeddings, position embeddings, norms) + one layer + the
activations of one token. That holds only if a dropped layer's memory goes back to the system:
glibc keeps freed blocks of a layer's size in its heap, fragmented between the next layer's
allocations, and the process then grew by about half a layer per layer read (a 12-layer
fp32 model: +350 MiB), so each release ends with ``malloc_trim``. Checkpoints whose tensor
names differ from the in-memory names (transformers converts some MoE checkpoints on load) are
refused with a clear message; use the full load for those.
"""

from __future__ import annotations

import ctypes
import functools
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import find_ffn_blocks
from ...core.locator import (
    LocatorError,
    LocatorResult,
    ProbeToken,
    locate_massive_weights,
)


@dataclass
class LoadStats:
    """What the layer-by-layer loader actually held, for the record and the tests."""

    layers_loaded: list[int] = field(default_factory=list)
    peak_bytes: int = 0  # largest total of materialised parameter bytes at any moment
    resident_bytes: int = 0
    max_resident_layers: int = 0
    _resident_layers: int = 0

    def add(self, nbytes: int, layer: bool) -> None:
        self.resident_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        if layer:
            self._resident_layers += 1
            self.max_resident_layers = max(self.max_resident_layers, self._resident_layers)

    def drop(self, nbytes: int) -> None:
        self.resident_bytes -= nbytes
        self._resident_layers -= 1


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (see the module docstring)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _weight_map(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in mapping.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise LocatorError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (layer-by-layer loading reads safetensors only)"
    )


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Total size of the safetensors files of a local model folder (0 if none)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


class LayerByLayerModel:
    """A meta-device model whose parameters are read from safetensors on demand."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.weights = _weight_map(self.model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.model.config._name_or_path = str(model_dir)
        self.blocks = find_ffn_blocks(self.model)
        self.stats = LoadStats()
        self._files = ExitStack()
        self._handles: dict[Path, Any] = {}
        prefix = getattr(self.model, "base_model_prefix", "")
        self._strip = f"{prefix}." if prefix else ""

    # ------------------------------------------------------------------ tensors
    def _checkpoint_name(self, name: str) -> Optional[str]:
        if name in self.weights:
            return name
        if self._strip and name.startswith(self._strip) and name[len(self._strip) :] in self.weights:
            return name[len(self._strip) :]  # checkpoints saved from the base model (old GPT-2)
        return None

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self._checkpoint_name(name)
        if key is None:
            raise LocatorError(
                f"{self.model_dir}: tensor '{name}' is not in the checkpoint under that name "
                "(this checkpoint needs transformers' key conversion): locate with the full load instead"
            )
        path = self.weights[key]
        if path not in self._handles:
            self._handles[path] = self._files.enter_context(safe_open(str(path), "pt"))
        return self._handles[path].get_tensor(key).to(self.dtype)

    def _materialise(self, module: nn.Module, prefix: str, layer: bool) -> int:
        from accelerate.utils import set_module_tensor_to_device

        nbytes = 0
        for name, param in module.named_parameters(recurse=True):
            if param.device.type != "meta":
                continue
            value = self._read(prefix + name)
            set_module_tensor_to_device(module, name, "cpu", value=value)
            nbytes += value.numel() * value.element_size()
        self.stats.add(nbytes, layer)
        return nbytes

    def _release(self, module: nn.Module, nbytes: int) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(module.named_parameters(recurse=True)):
            set_module_tensor_to_device(module, name, "meta")
        self.stats.drop(nbytes)
        return_freed_memory()

    # ------------------------------------------------------------------ lifecycle
    def load_non_layer_parameters(self) -> None:
        """Everything outside the decoder layers that the checkpoint has, except an untied output
        head: the probe stops at the last decoder layer at the latest, so the head never runs
        (Llama-3-8B's is 2 GiB in float32, half of the non-layer parameters)."""
        skip = {id(p) for b in self.blocks for p in b.layer.parameters()}
        head = self.model.get_output_embeddings()
        if head is not None:
            tied = {id(p) for p in self.model.get_input_embeddings().parameters()}
            skip |= {id(p) for p in head.parameters()} - tied
        from accelerate.utils import set_module_tensor_to_device

        nbytes = 0
        for name, param in self.model.named_parameters():
            if id(param) in skip or param.device.type != "meta":
                continue
            if self._checkpoint_name(name) is None:
                continue  # e.g. a tied or unused head: the probe stops before it
            value = self._read(name)
            set_module_tensor_to_device(self.model, name, "cpu", value=value)
            nbytes += value.numel() * value.element_size()
        self.stats.add(nbytes, layer=False)

    def attach(self) -> list:
        """Hooks that read each layer right before it runs and drop it right after."""
        handles, sizes = [], {}
        for block in self.blocks:

            def pre(module, args, kwargs, block=block, prefix=block.layer_prefix):
                sizes[block.index] = self._materialise(module, prefix, layer=True)
                self.stats.layers_loaded.append(block.index)

            def post(module, args, output, block=block):
                self._release(module, sizes.pop(block.index))

            handles.append(block.layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.layer.register_forward_hook(post))
        return handles

    def close(self) -> None:
        self._files.close()


def locate_layer_by_layer(
    model_dir: str | Path,
    k: int = 5,
    *,
    dtype: torch.dtype = torch.float32,
    probe_token: int | str | None = None,
    tokenizer: Any = None,
    layer: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    first_token: Optional[ProbeToken] = None,
) -> tuple[LocatorResult, LoadStats]:
    """The locator's answer for ``model_dir`` holding about one layer in memory at a time."""
    lazy = LayerByLayerModel(model_dir, dtype)
    handles = []
    try:
        lazy.load_non_layer_parameters()
        handles = lazy.attach()
        result = locate_massive_weights(
            lazy.model,
            k,
            probe_token=probe_token,
            tokenizer=tokenizer,
            first_token=first_token,
            layer=layer,
            indices=indices,
            blocks=lazy.blocks,
            stop_early=True,
        )
    finally:
        for h in handles:
            h.remove()
        lazy.close()
    result.model = str(model_dir)
    return result, lazy.stats
