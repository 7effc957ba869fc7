"""The origin rule: which layer's residual stream becomes massive and stays so (docs/locator.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # result.py imports RULE from here
    from .result import LayerStats

MASSIVE_ABS = 100.0  # Sun et al.: a massive activation has |a| > 100 ...
MEDIAN_RATIO = 100.0  # ... far above the median (theirs: 1000x over a whole sequence; here one token)
MIN_JUMP = 50.0  # created at this layer, not carried in: out_max >= MIN_JUMP x in_max
PERSIST_LAYERS = 2  # ... and kept by this many following layers
KEEP_FRACTION = 0.5  # ... at no less than this fraction of its value
RULE = (
    f"origin = first layer whose residual max at the probe token exceeds {MASSIVE_ABS:g} and "
    f"{MEDIAN_RATIO:g}x its median, after a >= {MIN_JUMP:g}x jump, and keeps >= {KEEP_FRACTION:g} of it "
    f"for {PERSIST_LAYERS} layers; probe = the first candidate token that has one; "
    "indices = top-k |intermediate| there"
)


def is_massive(stat: LayerStats) -> bool:
    """The residual stream leaving this layer holds a massive activation at the probe token."""
    median = stat.out_median if stat.out_median is not None else 0.0
    return stat.out_max > MASSIVE_ABS and stat.out_max >= MEDIAN_RATIO * median


def find_origin(stats: Sequence[LayerStats], last_layer: int) -> Optional[int]:
    """Position in ``stats`` of the origin layer, or None.

    The origin is the FIRST layer that is massive (:func:`is_massive`), created there (jump >=
    :data:`MIN_JUMP`) and kept by the next :data:`PERSIST_LAYERS` layers (>= :data:`KEEP_FRACTION`
    of its max; fewer when the model ends first). ``stats`` may stop early (layer by layer): a
    layer whose window is not complete yet is undecided and None is returned, so the answer never
    depends on layers beyond origin + PERSIST_LAYERS and an early stop gives the full answer.
    """
    for i, s in enumerate(stats):
        if not (is_massive(s) and s.jump >= MIN_JUMP):
            continue
        window = stats[i + 1 : i + 1 + PERSIST_LAYERS]
        if len(window) < PERSIST_LAYERS and stats[-1].layer != last_layer:
            return None  # undecided until more layers are seen
        if all(w.out_max >= KEEP_FRACTION * s.out_max for w in window):
            return i
    return None
