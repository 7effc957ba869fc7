"""MacDrop inside a training host (docs/hosts.md): ``transformers/`` for any transformers Trainer
(``with_macdrop``, ``MacDropCallback``, the checks every host runs), ``axolotl/`` for axolotl's
plugin system. The LLaMA-Factory plugin (``plugin/``) builds its trainers with ``transformers/``.
Nothing here imports LLaMA-Factory."""
