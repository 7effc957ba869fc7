"""Loading a model to analyse: one line for what cannot be loaded, before anything heavy runs.

Why here and not in the CLI: ``macdrop compare`` evaluates adapters on a base it loads itself,
notebooks load models the same way, and the checks (a folder without config.json, a tokenizer
folder that is not one, an adapter trained on another base) must read the same everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ...errors import MacDropError


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelPathError(MacDropError, FileNotFoundError):
    """MODEL names no model this command can load (one line, exit 2)."""


class AdapterError(MacDropError, ValueError):
    """An adapter folder that is not one, or that was trained on another base (one line, exit 2)."""


def check_model(path: str) -> None:
    """One line, before anything loads, when MODEL is not a model folder (or a hub id that resolves).

    A local path must be a folder with config.json; a name that is no local path is tried as a hub
    id (transformers' own config lookup, which answers at once offline)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelPathError(f"{path}: no config.json in that folder: give a Hugging Face model folder "
                                 "(config.json and weights; `macdrop convert-gguf` makes one from a GGUF file)")
        return
    if folder.exists():
        raise ModelPathError(f"{path} is a file, not a model folder: give the folder that holds config.json")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelPathError(f"{path}: no such folder, and not a model the hub serves here ({reason[:160]})") from None


def load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    check_model(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).eval()
    except OSError as err:  # a folder whose weights are missing or unreadable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelPathError(f"{path}: the model does not load ({reason[:200]})") from None


def config_facts(path: str) -> tuple:
    """(config bos_token_id, vocab_size) from the checkpoint's config.json, before the model loads
    (Nones when it cannot be read): what the prefix checks name and bound."""
    from ...core.model_config import read_config_json, vocab_size
    from ...core.text_prefix import config_bos_token_id

    found = read_config_json(path)
    if found is None:
        return None, None
    return config_bos_token_id(found[1]), vocab_size(found[1])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str):
    """The model's tokenizer, or None. A local folder without tokenizer files gets None: transformers
    would build an empty tokenizer of the model type there, whose special-token ids are not the model's."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


#: the weight files peft saves an adapter in, the one it prefers first
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_config(adapter_dir: str | Path, option: str = "--adapter") -> dict:
    """``adapter_dir/adapter_config.json`` as a dict, or one line saying what is wrong with it
    (missing, not UTF-8, not JSON or cut short, not an object): the one reader of that file."""
    folder = Path(adapter_dir)
    path = folder / "adapter_config.json"
    where = f"{option} {folder}"
    if not path.is_file():
        raise AdapterError(f"{where}: no adapter_config.json there (give a LoRA/DoRA output_dir)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterError(f"{where}: adapter_config.json is not UTF-8 text (byte offset {err.start})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        cut = "; it looks cut short" if err.pos >= len(text.rstrip()) else ""
        raise AdapterError(f"{where}: adapter_config.json is not valid JSON ({err}{cut})") from None
    if not isinstance(config, dict):
        kind = {list: "an array", str: "a string"}.get(type(config), type(config).__name__)
        raise AdapterError(f"{where}: adapter_config.json holds {kind}, not peft's adapter config (a JSON object)")
    return config


def check_adapter(adapter_dir: str | Path, option: str = "--adapter") -> dict:
    """Everything about an adapter folder that can be checked before any model loads: its config
    (:func:`read_adapter_config`) and its weights file (there, and a safetensors file whose header
    covers the file: a truncated copy fails here, not inside peft). Returns the config."""
    folder = Path(adapter_dir)
    config = read_adapter_config(folder, option)
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise AdapterError(
            f"{option} {folder}: no adapter weights there ({' or '.join(ADAPTER_WEIGHTS)}): give the output_dir "
            "of a finished LoRA/DoRA run, or one of its checkpoint-N folders"
        )
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors' own error type (SafetensorError) is not importable by name
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AdapterError(f"{option} {weights} cannot be read ({first}): is the file complete?") from None
    return config


def attach_adapter(model: nn.Module, adapter_dir: str | Path, model_path: str = "") -> nn.Module:
    """``model`` + the LoRA/DoRA adapter in ``adapter_dir`` (a PeftModel, adapter active).

    The attacks then edit the frozen base weights under the adapter, which is what the paper's
    robustness comparison does. A folder that is no readable adapter is refused in one line
    (:func:`check_adapter`); an adapter trained on another base too: by its recorded base model's
    config when that folder is here, else by peft's shape check.
    """
    folder = Path(adapter_dir)
    config = check_adapter(folder)
    recorded = config.get("base_model_name_or_path") or "?"
    base_config = Path(str(recorded)) / "config.json"
    mine = getattr(model, "config", None)
    if base_config.is_file() and mine is not None:
        try:
            theirs = json.loads(base_config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            theirs = None  # peft's shape check below decides
        keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        diff = [k for k in keys if isinstance(theirs, dict) and k in theirs and theirs[k] != getattr(mine, k, None)]
        if diff:
            k = diff[0]
            raise AdapterError(
                f"--adapter {folder} was trained on {recorded} ({k}={theirs[k]}), not on {model_path or 'this model'} "
                f"({k}={getattr(mine, k, None)})"
            )
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterError(
            f"--adapter {folder} does not fit {model_path or 'this model'} (trained on {recorded}): {first}"
        ) from None
