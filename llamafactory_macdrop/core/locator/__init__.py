"""Find the massive layer and its top-k massive weights with single-token forward passes.

The rule (docs/locator.md): feed a probe token alone at position 0 and record, for every decoder
layer l, the residual stream entering the layer (``in_max``) and leaving it (``out_max``,
``out_median``) and the intermediate state act(gate(x)) * up(x) of its FFN, all at that token.

* A layer is the ORIGIN of the massive activation when the residual stream there *becomes
  massive and stays so* (:func:`find_origin`): its max leaving the layer is above
  :data:`MASSIVE_ABS` (Sun et al.'s |a| > 100) and at least :data:`MEDIAN_RATIO` times the median
  of the same vector, it was created there (at least :data:`MIN_JUMP` times the max entering the
  layer), and the next :data:`PERSIST_LAYERS` layers keep at least :data:`KEEP_FRACTION` of it.
  The FIRST such layer wins, so a layer-by-layer reader may stop :data:`PERSIST_LAYERS` layers
  after it with the same answer. A jump alone is fooled by tiny embeddings (0.05 -> 4 is an 80x
  jump of nothing); a threshold alone is fooled by early spikes that fade (SmolLM2-135M: 769 at
  layer 2, created with a 2.6x jump, gone by layer 9; the origin is layer 11, 29 -> 24,926).
* The top-k massive weights are the rows of W_up/W_gate at that layer whose intermediate units
  have the largest |value|, largest first.
* Which token (:func:`probe_candidates`): what the model really sees first (the first training
  batch's position-0 token, or what the chat template / tokenizer puts first), then BOS/EOS.
  Each candidate is probed; the first one that produces a massive activation is used. When none
  does, a warning says so and the largest residual jump of the first candidate stands in.

The package: :mod:`.probe` (the probe forward and the candidate tokens), :mod:`.rule` (the origin
rule), :mod:`.locate` (``locate_massive_weights``), :mod:`.result` (the result, its table and
JSON) and :mod:`.files` (reading the JSON back, resume). Everything public is importable from
``llamafactory_macdrop.core.locator`` as before.
"""

from .files import read_locator_file, read_resumed_locator_file, reuse_result
from .locate import locate_massive_weights
from .probe import probe_candidates, probe_ffn_states, resolve_probe_token, token_text
from .result import LOCATOR_FILE, CandidateResult, LayerStats, LocatorError, LocatorResult, ProbeToken, RouterProbs
from .rule import KEEP_FRACTION, MASSIVE_ABS, MEDIAN_RATIO, MIN_JUMP, PERSIST_LAYERS, RULE, find_origin, is_massive

__all__ = [
    "KEEP_FRACTION",
    "LOCATOR_FILE",
    "MASSIVE_ABS",
    "MEDIAN_RATIO",
    "MIN_JUMP",
    "PERSIST_LAYERS",
    "RULE",
    "CandidateResult",
    "LayerStats",
    "LocatorError",
    "LocatorResult",
    "ProbeToken",
    "RouterProbs",
    "find_origin",
    "is_massive",
    "locate_massive_weights",
    "probe_candidates",
    "probe_ffn_states",
    "read_locator_file",
    "read_resumed_locator_file",
    "resolve_probe_token",
    "reuse_result",
    "token_text",
]
