"""The axolotl plugin: when it acts.

* axolotl validates the YAML -> :class:`.args.MacDropArgs` (merged into its schema through
  :meth:`MacDropPlugin.get_input_args`) checks the ``macdrop_*`` keys and this configuration
  before any dataset or model loads;
* axolotl built its trainer -> :meth:`MacDropPlugin.post_trainer_create` gives THAT trainer
  MacDrop (:func:`~llamafactory_macdrop.integrations.transformers.trainer.attach_macdrop`: the
  instance's class becomes ``with_macdrop(its class)``), after the checks every host runs on a
  Trainer's arguments and model.

Why ``post_trainer_create`` and not ``get_trainer_cls``: axolotl takes the FIRST non-None class
any plugin returns, in place of the one it would choose itself (AxolotlTrainer, its DPO trainer,
a ``trainer_cls:`` from the YAML, another plugin's); returning a class would silently replace
theirs. Extending whatever trainer axolotl built keeps its choice and every other plugin's.
axolotl's LoRA kernels (``lora_mlp_kernel``, on by default for lora/qlora) read
``base_layer.weight`` directly, bypassing the modules' forward and hooks: MacDrop edits that very
tensor in place, so they compute with the masked rows too (tests/axolotl).
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from .args import macdrop_config


class MacDropPlugin(BasePlugin):
    """MacDrop (massive-weights curriculum dropout) for axolotl: ``macdrop: true`` and ``macdrop_*`` keys."""

    def get_input_args(self) -> str:
        return "llamafactory_macdrop.integrations.axolotl.args.MacDropArgs"

    def post_trainer_create(self, cfg, trainer) -> None:
        if not cfg.get("macdrop"):
            return
        from ..transformers.trainer import attach_macdrop, logger

        config = macdrop_config(cfg)
        attach_macdrop(trainer, config)
        logger.info(
            "MacDrop on (axolotl, %s): k=%d p0=%g curriculum=%s scope=%s mask_per=%s",
            type(trainer).__name__,
            config.macdrop_k,
            config.macdrop_p0,
            config.macdrop_curriculum,
            config.macdrop_scope,
            config.macdrop_mask_per,
        )
