"""MacDrop: curriculum dropout on the massive weights of an LLM, for LLaMA-Factory.

This module is imported at every interpreter start (through the ``.pth`` hook), so it must stay
empty of heavy imports. The pure core lives in ``curriculum``, ``masking``, ``locator`` and
``architectures``; ``integration`` is the only module that touches LLaMA-Factory.
"""

__version__ = "0.1.0"
