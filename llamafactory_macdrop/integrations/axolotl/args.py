"""The ``macdrop_*`` keys as axolotl reads them: one typed pydantic model merged into axolotl's
config schema (``get_input_args``), checked when axolotl validates the YAML, before any dataset
or model loads.

The names, types, defaults and help texts are :class:`~llamafactory_macdrop.plugin.keys.MacDropConfig`'s
(the allowed values are its ``Literal`` types themselves; tests/axolotl checks that the two agree).
Pydantic reads the YAML's types; :meth:`MacDropArgs.check_macdrop` then hands the values to
``MacDropConfig`` for the ranges and combinations every host checks, and refuses, in one line,
what MacDrop cannot do with this axolotl configuration: no adapter (full fine-tuning trains the
rows MacDrop drops), RL methods outside Algorithm 1, 8-bit or GPTQ weights, DoRA at p0 = 1, and
what the model's config.json already tells (``check_model_config``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, Field, model_validator

from ...plugin.keys import Curriculum, MacDropConfig, MaskPer, Scope

_HELP = {name: help_text for name, _type, _default, help_text in MacDropConfig.key_reference()}


class MacDropArgs(BaseModel):
    """Input args for MacDrop (``plugins: [llamafactory_macdrop.integrations.axolotl.MacDropPlugin]``)."""

    macdrop: bool = Field(default=False, description=_HELP["macdrop"])
    macdrop_k: int = Field(default=5, description=_HELP["macdrop_k"])
    macdrop_p0: float = Field(default=0.8, description=_HELP["macdrop_p0"])
    macdrop_curriculum: Curriculum = Field(default="step", description=_HELP["macdrop_curriculum"])
    macdrop_alpha: float = Field(default=0.01, description=_HELP["macdrop_alpha"])
    macdrop_scope: Scope = Field(default="massive", description=_HELP["macdrop_scope"])
    macdrop_layer: Optional[int] = Field(default=None, description=_HELP["macdrop_layer"])
    macdrop_indices: Optional[list[int]] = Field(default=None, description=_HELP["macdrop_indices"])
    macdrop_mask_per: MaskPer = Field(default="optimizer_step", description=_HELP["macdrop_mask_per"])
    macdrop_probe_token: Optional[Union[int, str]] = Field(default=None, description=_HELP["macdrop_probe_token"])

    @model_validator(mode="before")
    @classmethod
    def check_macdrop(cls, data: Any) -> Any:
        """With ``macdrop: true``: the keys as every host checks them, then this configuration."""
        from .checks import check_axolotl_config, switched_on

        if not isinstance(data, dict) or not switched_on(data):
            return data

        check_axolotl_config(data)
        return data


def macdrop_config(cfg: Any) -> MacDropConfig:
    """The typed config of an axolotl config (its validated ``macdrop_*`` values)."""
    raw = {name: cfg.get(name) for name in MacDropArgs.model_fields if cfg.get(name) is not None}
    return MacDropConfig.from_raw(raw)
