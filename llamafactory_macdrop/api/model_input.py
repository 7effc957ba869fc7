"""What an API function is given to analyse: a model folder, or a model already in memory.

Why one class: every command checks what it can before the model loads (config.json's widths, the
tokenizer's prefix, the long-context lengths), then loads once. With a folder that is the CLI's
order; with a loaded model + tokenizer (a notebook) the same checks read the live config, nothing
is loaded, and the model is handed back as it came: its dtype, its device, its weights (every edit
is undone bit for bit), no adapter left attached.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from torch import nn

from ..analysis.models.loading import ModelPathError, check_model, load_model, load_tokenizer


class ModelInput:
    """A folder (``path``) or a loaded ``module`` (+ its tokenizer); ``label`` names it in reports."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.module: Optional[nn.Module] = model if isinstance(model, nn.Module) else None
        self.path: Optional[str] = None if self.module is not None else str(model)
        self._tokenizer = tokenizer
        self._tokenizer_loaded = tokenizer is not None
        self._was_training = self.module.training if self.module is not None else False
        self._attached: Optional[nn.Module] = None

    def check(self) -> "ModelInput":
        """One line, before anything loads, when a folder is no model folder (a loaded model passes)."""
        if self.path is not None:
            check_model(self.path)
        return self

    def require_tokenizer(self, why: str):
        """The tokenizer (loaded once), or one line saying where none was found and what needs it."""
        self.check()
        if self.tokenizer is None:
            where = "next to the model" if self.path is not None else "(give tokenizer=)"
            raise ModelPathError(f"{self.label}: no tokenizer found {where} ({why})")
        return self.tokenizer

    @property
    def loaded(self) -> bool:
        return self.module is not None

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path
        config = getattr(self.module, "config", None)
        return str(
            getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or type(self.module).__name__
        )

    @property
    def tokenizer(self):
        if not self._tokenizer_loaded:
            self._tokenizer = load_tokenizer(self.path) if self.path is not None else None
            self._tokenizer_loaded = True
        return self._tokenizer

    def config(self) -> Optional[dict]:
        """config.json as the checkpoint has it (a folder), or the loaded model's config."""
        if self.module is not None:
            config = getattr(self.module, "config", None)
            return config.to_dict() if hasattr(config, "to_dict") else None
        from ..core.model_config import read_config_json

        found = read_config_json(self.path)
        return found[1] if found is not None else None

    def config_source(self) -> str:
        """Where :meth:`config` reads from, for the messages that name it."""
        if self.module is not None:
            return f"{self.label}'s config"
        return str(Path(self.path) / "config.json")

    def facts(self) -> tuple:
        """(config bos_token_id, vocab_size): what the prefix checks name and bound."""
        from ..core.model_config import vocab_size
        from ..core.text_prefix import config_bos_token_id

        config = self.config()
        return (config_bos_token_id(config), vocab_size(config)) if config is not None else (None, None)

    def load(self, dtype: str, device: Optional[str] = None) -> nn.Module:
        """The model to analyse: loaded from the folder in ``dtype`` on ``device``, or the given one as it is."""
        if self.module is not None:
            return self.module
        model = load_model(self.path, dtype)
        return model.to(device) if device is not None else model

    @contextmanager
    def in_use(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` in eval mode for the analysis; afterwards a model the user gave is theirs again:
        an adapter attached for the call taken out (:func:`attach`), its train/eval mode back."""
        model.eval()
        try:
            yield model
        finally:
            if self.module is not None:
                if self._attached is not None:
                    self._attached.unload()  # peft takes its layers out of the user's modules
                self.module.train(self._was_training)
            self._attached = None

    def attach(self, model: nn.Module, adapter) -> nn.Module:
        """``model`` + the adapter folder (a PeftModel); call inside :meth:`in_use`, which takes it out again."""
        from ..analysis.models.loading import attach_adapter

        self._attached = attach_adapter(model, adapter, self.label)
        return self._attached


def refuse_load_options(source: ModelInput, given: dict, names=("dtype", "device")) -> None:
    """Options that say how to load: refused for a model that is already loaded (not ignored)."""
    if source.module is None:
        return
    for name in names:
        if given.get(name) is not None:
            raise ModelPathError(
                f"{name}={given[name]!r} applies to a model folder: a loaded model is used as it is "
                "(move or cast it before the call)"
            )
