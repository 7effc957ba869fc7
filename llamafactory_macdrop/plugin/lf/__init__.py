"""The seam to LLaMA-Factory: the ONLY modules that import it (tested against llamafactory 0.9.5).

:mod:`.arguments` reads its arguments and defaults and validates a run before anything loads;
:mod:`.patches` wraps its launcher, ``run_exp`` and ``export_model`` and swaps the stage's trainer
class; :mod:`.templates` looks up its chat templates. If LLaMA-Factory changes, these files change.
"""
