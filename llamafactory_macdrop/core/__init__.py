"""The method, importable without LLaMA-Factory (torch and transformers-style modules only).

* where: :mod:`.architectures` (FFN layouts found by structure), :mod:`.locator` (the massive
  layer and rows, by a probe forward), :mod:`.first_token` (which token the model sees first),
  :mod:`.model_config` (a checkpoint's config.json without a download), :mod:`.probing` (how a
  measurement forward runs);
* how much, when: :mod:`.curriculum` (p as a function of training progress);
* what it does to the weights: :mod:`.masking` (Algorithm 1's row dropout and exact restore) over
  :mod:`.storage` (one small backend per weight storage: dense, ZeRO-3, FSDP1/2, 4-bit);
* what the papers found: :mod:`.published` (published massive-weight and super-weight positions,
  the models they belong to by config.json fields, and the comparison with a located position).

Nothing in this subpackage imports :mod:`llamafactory_macdrop.plugin`, :mod:`..analysis` or
LLaMA-Factory (tests/test_layout.py checks it).
"""
