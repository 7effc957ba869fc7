"""Attacks on a loaded model, applied in place and undone bit for bit (House of Cards, Table 1).

Why in place: an attack sweep (several k, two modes, a baseline) must cost ONE model load, and
every evaluator (the perplexity loop, lm-eval's HFLM) must see the attacked weights without
knowing anything about attacks. So each setting edits the weights the evaluators already hold,
runs, and puts the saved values back; :meth:`ModelAttacker.verify_restored` compares every weight
an attack may touch with a snapshot taken before the first edit, bit for bit.

Modes (``AttackSetting.mode``):

``clean``        the unattacked baseline (always the first row of a sweep).
``zero``         top-k zeroing: rows idx[:k] of W_up and W_gate at the massive layer := 0.
``retain``       top-k retaining: every OTHER row of W_up and W_gate at that layer := 0.
``superweight``  the super weight W_down[row, col] (Yu et al.) := ``scale`` x itself (0 = zero it).
``activation``   the massive activations (Sun et al.) leaving their origin layer := 0 or their
                 mean value (``fill``), through a forward hook that is removed afterwards.
``sw_restore``   the super weight(s) zeroed, and the super activation written back: at every
                 position where the original down-projection output in the super weight's row
                 exceeds the target's ``activation_cutoff``, that output gets its original value
                 (Yu et al.'s "restore the super activation" experiment). The original value is
                 recomputed in the same forward pass as the zeroed output plus
                 ``input[col] * original weight``: the down projection's input does not depend on
                 the super weight (it sits after it), so this is the value the unattacked model
                 has there, window by window, for every evaluator alike.

Several super weights (``AttackTargets.super_weights``) are scaled, zeroed and restored together.

The rows come from the architecture's block API (``FFNBlock.row_targets``/``down_target``) and
are edited with :class:`~llamafactory_macdrop.core.masking.RowDropout` (an all-zero or scaled keep
mask), so every layout the locator supports is attacked the same way: Phi-3's fused
``gate_up_proj`` halves, GPT-2's transposed Conv1D, W_up alone without a gate, and the routed
expert of a MoE layer. Adapters are seen through: the frozen base weights are edited, a LoRA/DoRA
adapter on top stays as trained (the paper's robustness comparison).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, find_ffn_blocks
from ...core.masking import RowDropout
from ...core.probing import first_tensor
from ...core.storage import bits
from ...errors import MacDropError
from ..inspect.activations import activation_report
from ..inspect.superweight import find_super_weights

MODES = ("clean", "zero", "retain", "superweight", "activation", "sw_restore")
ATTACK_MODES = MODES[1:]
ACTIVATION_FILLS = ("zero", "mean")


class AttackError(MacDropError, ValueError):
    """An attack setting or target that cannot be applied to this model."""


@dataclass(frozen=True)
class AttackSetting:
    """One row of a sweep: what is done to the model before it is evaluated."""

    mode: str
    k: int = 0  # zero/retain: how many top rows (0 for the other modes)
    scale: Optional[float] = None  # superweight: factor applied to the super weight (0.0 zeroes it)
    fill: Optional[str] = None  # activation: "zero" or "mean"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AttackError(f"--mode {self.mode!r} is not allowed: choose from {', '.join(ATTACK_MODES)}")
        if self.mode in ("zero", "retain") and self.k < 1:
            raise AttackError(f"--k {self.k} is not allowed for mode {self.mode}: k must be >= 1")
        if self.mode == "activation" and self.fill not in ACTIVATION_FILLS:
            raise AttackError(f"--fill {self.fill!r} is not allowed: choose from {', '.join(ACTIVATION_FILLS)}")

    @property
    def label(self) -> str:
        if self.mode in ("zero", "retain"):
            return f"{self.mode} k={self.k}"
        if self.mode == "superweight":
            return f"superweight x{self.scale:g}"
        if self.mode == "activation":
            return f"activation := {self.fill}"
        if self.mode == "sw_restore":
            return "superweight x0 + SA restored"
        return "clean"

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def sweep_settings(
    modes: Sequence[str], ks: Sequence[int], scales: Sequence[float] = (0.0,), fills: Sequence[str] = ("zero",)
) -> list[AttackSetting]:
    """The baseline, then every mode x k (zero/retain), x scale (superweight), x fill (activation).

    k = 0 stands for the baseline only: "retain the top-0" would zero the whole layer, which is
    not what a k = 0 point on the paper's curves means.
    """
    unknown = [m for m in modes if m not in ATTACK_MODES]
    if unknown:
        raise AttackError(f"--mode {','.join(unknown)} is not allowed: choose from {', '.join(ATTACK_MODES)}")
    bad_k = [k for k in ks if k < 0]
    if bad_k:
        raise AttackError(f"--k {bad_k[0]} is not allowed: k must be >= 0")
    settings = [AttackSetting("clean")]
    for mode in dict.fromkeys(modes):  # keep order, drop repeats
        if mode in ("zero", "retain"):
            settings += [AttackSetting(mode, k) for k in sorted(set(ks)) if k > 0]
        elif mode == "superweight":
            settings += [AttackSetting(mode, scale=float(s)) for s in dict.fromkeys(scales)]
        elif mode == "sw_restore":  # compared with the zeroed super weight: that row comes first
            zeroed = AttackSetting("superweight", scale=0.0)
            settings += [zeroed] * (zeroed not in settings) + [AttackSetting(mode)]
        else:
            settings += [AttackSetting(mode, fill=f) for f in dict.fromkeys(fills)]
    return settings


@dataclass
class SuperWeightTarget:
    """``W_down[row, col]`` of ``layer`` (row: hidden dimension, col: intermediate unit).

    ``activation_cutoff``: where the super activation is (mode ``sw_restore``): positions whose
    down output in ``row`` exceeds it in magnitude (:func:`set_activation_cutoffs`)."""

    layer: int
    row: int
    col: int
    activation_cutoff: Optional[float] = None

    def __str__(self) -> str:
        return f"layer {self.layer} W_down[{self.row}, {self.col}]"


@dataclass
class MassiveActivationTarget:
    """The massive dimensions leaving ``layer`` and the values an attack may write there.

    ``means`` are the signed means of the massive entries per dimension (Sun et al. replace them
    with their mean over many inputs; here: over the probe input). An entry of the layer's output
    in a massive dimension counts as massive when its magnitude exceeds ``cutoffs`` (half the
    mean magnitude): massive values are orders of magnitude above the rest, so any split between
    them works, and a relative one needs no per-model threshold.
    """

    layer: int
    dims: list[int]
    means: list[float]

    @property
    def cutoffs(self) -> list[float]:
        return [0.5 * abs(m) for m in self.means]


@dataclass
class AttackTargets:
    """Where the attacks act: the located massive layer and its rows, ranked (largest first),
    and optionally the super weight and the massive activations."""

    layer: int
    indices: list[int]
    expert: Optional[int] = None
    super_weight: Optional[SuperWeightTarget] = None
    activations: Optional[MassiveActivationTarget] = None
    super_weights: list[SuperWeightTarget] = field(default_factory=list)  # several; else [super_weight]

    def all_super_weights(self) -> list[SuperWeightTarget]:
        return list(self.super_weights) or ([self.super_weight] if self.super_weight is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelAttacker:
    """Applies :class:`AttackSetting` s to one model in place; see the module docstring.

    The snapshot for :meth:`verify_restored` holds W_up/W_gate of the massive layer (or expert)
    and, when a super weight is targeted, its down-projection column: every value an attack
    writes. Activation attacks write no weight (a hook), so nothing else needs a copy.
    """

    def __init__(self, model: nn.Module, targets: AttackTargets, blocks: Optional[Sequence[FFNBlock]] = None) -> None:
        self.model = model
        self.targets = targets
        self.blocks = {b.index: b for b in (blocks if blocks is not None else find_ffn_blocks(model))}
        if targets.layer not in self.blocks:
            raise AttackError(
                f"--layer {targets.layer} is out of range: the model has layers 0..{len(self.blocks) - 1}"
            )
        self.block = self.blocks[targets.layer]
        size = self.block.intermediate_size
        bad = [i for i in targets.indices if not 0 <= i < size]
        if bad or len(set(targets.indices)) != len(targets.indices):
            raise AttackError(
                f"--indices {targets.indices}: need distinct units in 0..{size - 1} (layer {targets.layer})"
            )
        self._watched = self.block.row_targets(torch.arange(size), expert=targets.expert)
        check_super_weights(self.blocks, targets.all_super_weights())
        for layer, col in dict.fromkeys((sw.layer, sw.col) for sw in targets.all_super_weights()):
            self._watched.append(self.blocks[layer].down_target([col]))
        # the unattacked values, for sw_restore's "what the zeroed weight wrote"
        self._sw_values = {
            (sw.layer, sw.row, sw.col): float(self.blocks[sw.layer].down_target([sw.col]).read()[0, sw.row])
            for sw in targets.all_super_weights()
        }
        self._snapshot = [bits(t.read()).clone() for t in self._watched]

    # ------------------------------------------------------------------ checks
    @property
    def max_k(self) -> int:
        return len(self.targets.indices)

    def verify_restored(self) -> None:
        """Raise unless every watched weight equals its snapshot bit for bit."""
        changed = [t.name for t, snap in zip(self._watched, self._snapshot) if not torch.equal(bits(t.read()), snap)]
        if changed:
            raise RuntimeError(f"weights not restored bitwise after the attacks: {changed}")

    # ------------------------------------------------------------------ applying
    def applied(self, setting: AttackSetting):
        """Apply ``setting`` for the duration of the block; always undone on exit (errors too).
        Which edit a mode makes is :data:`_EDITS` (one entry per mode, as storage/factory.py
        picks a backend)."""
        return self._EDITS[setting.mode](self, setting)

    @contextmanager
    def _unchanged(self, setting: AttackSetting) -> Iterator[None]:
        yield

    @contextmanager
    def _rows(self, setting: AttackSetting) -> Iterator[None]:
        """zero / retain: a keep mask of zeros over the rows of W_up and W_gate the setting names."""
        dropout, keep = self._edit(setting)
        try:
            dropout.apply(keep)  # inside: if a later target's write fails, the earlier ones are restored
            yield
        finally:
            dropout.restore()

    @contextmanager
    def _super_weights(self, setting: AttackSetting) -> Iterator[None]:
        """superweight: scale them; sw_restore: zero them and write the super activation back."""
        sws = self.targets.all_super_weights()
        if not sws:
            raise AttackError(
                f"mode {setting.mode} needs a super weight (found by the probe or given as --super-weight L,ROW,COL)"
            )
        scale = 0.0 if setting.mode == "sw_restore" else setting.scale
        with scaled_super_weights(self.blocks, sws, scale):
            if setting.mode == "superweight":
                yield
            else:
                with restored_super_activation(
                    self.blocks, sws, [self._sw_values[(sw.layer, sw.row, sw.col)] for sw in sws]
                ):
                    yield

    def _edit(self, setting: AttackSetting) -> tuple[RowDropout, torch.Tensor]:
        """The rows a zero/retain attack touches and the multiplier (keep mask) it applies to them."""
        if setting.k > self.max_k:
            raise AttackError(f"--k {setting.k} exceeds the {self.max_k} located rows (layer {self.targets.layer})")
        top = self.targets.indices[: setting.k]
        if setting.mode == "zero":
            rows = top
        else:
            chosen = set(top)
            rows = [i for i in range(self.block.intermediate_size) if i not in chosen]
        dropout = RowDropout(self.block.row_targets(rows, expert=self.targets.expert))
        return dropout, torch.zeros(dropout.mask_shape, device=dropout.device)

    @contextmanager
    def _activations(self, setting: AttackSetting) -> Iterator[None]:
        with self._activation_hook(setting.fill):
            yield

    @contextmanager
    def _activation_hook(self, fill: str) -> Iterator[None]:
        act = self.targets.activations
        if act is None or not act.dims:
            raise AttackError("mode activation needs massive activations; the probe found none in this model")
        block = self.blocks[act.layer]
        dims = torch.tensor(act.dims, dtype=torch.long)
        cutoffs = torch.tensor(act.cutoffs)
        values = torch.tensor(act.means) if fill == "mean" else torch.zeros(len(act.dims))

        def hook(module, args, output):
            hidden = first_tensor(output)
            d = dims.to(hidden.device)
            current = hidden.index_select(-1, d)
            massive = current.abs() > cutoffs.to(hidden.device, hidden.dtype)
            replaced = torch.where(massive, values.to(hidden.device, hidden.dtype), current)
            hidden.index_copy_(-1, d, replaced)
            return output

        handle = block.layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


ModelAttacker._EDITS = {
    "clean": ModelAttacker._unchanged,
    "zero": ModelAttacker._rows,
    "retain": ModelAttacker._rows,
    "superweight": ModelAttacker._super_weights,
    "sw_restore": ModelAttacker._super_weights,
    "activation": ModelAttacker._activations,
}
assert set(ModelAttacker._EDITS) == set(MODES), "every mode needs an edit"


# ----------------------------------------------------------------------------- finding targets
def super_weight_target(
    model: nn.Module, input_ids, blocks: Optional[Sequence[FFNBlock]] = None
) -> Optional[SuperWeightTarget]:
    """The first candidate of :func:`~llamafactory_macdrop.analysis.inspect.superweight.find_super_weights` that
    CREATES the massive activation (None if there is none)."""
    report = find_super_weights(model, input_ids, blocks=blocks)
    for c in report.candidates:
        if c.creates:
            return SuperWeightTarget(c.layer, c.row, c.col)
    return None


def massive_activation_target(
    model: nn.Module, input_ids, blocks: Optional[Sequence[FFNBlock]] = None
) -> Optional[MassiveActivationTarget]:
    """The origin layer of the massive activations and their per-dimension means (None if none)."""
    report = activation_report(model, input_ids, blocks=blocks)
    origin = report.origin_layer
    if origin is None:
        return None
    found = next(layer for layer in report.layers if layer.layer == origin).massive
    dims = sorted({m.dim for m in found})
    means = [sum(m.value for m in found if m.dim == d) / sum(1 for m in found if m.dim == d) for d in dims]
    return MassiveActivationTarget(origin, dims, means)


# ----------------------------------------------------------------------------- several super weights
def check_super_weights(blocks: dict[int, FFNBlock], sws: Sequence[SuperWeightTarget]) -> None:
    """Refuse, in one line, a super weight that is not a W_down entry of this model."""
    for sw in sws:
        down_block = blocks.get(sw.layer)
        if down_block is None or getattr(down_block, "down", None) is None:
            raise AttackError(f"--super-weight layer {sw.layer}: not a dense layer of this model")
        width = down_block.down_target([sw.col]).read().shape[1]
        if not (0 <= sw.col < down_block.intermediate_size and 0 <= sw.row < width):
            raise AttackError(
                f"--super-weight {sw.layer},{sw.row},{sw.col}: row must lie in 0..{width - 1}, "
                f"col in 0..{down_block.intermediate_size - 1}"
            )


@contextmanager
def scaled_super_weights(blocks: dict[int, FFNBlock], sws: Sequence[SuperWeightTarget], scale: float) -> Iterator[None]:
    """Every super weight := ``scale`` x itself inside the block, restored bitwise on exit.

    One :class:`RowDropout` per W_down column (a keep mask is shared by the targets of one
    dropout, so two super weights in different columns cannot share one)."""
    columns: dict[tuple[int, int], list[int]] = {}
    for sw in sws:
        columns.setdefault((sw.layer, sw.col), []).append(sw.row)
    with ExitStack() as stack:
        for (layer, col), rows in columns.items():
            dropout = RowDropout([blocks[layer].down_target([col])])
            keep = torch.ones(dropout.mask_shape, device=dropout.device)
            keep[0, rows] = scale
            stack.callback(dropout.restore)
            dropout.apply(keep)
        yield


@contextmanager
def restored_super_activation(
    blocks: dict[int, FFNBlock], sws: Sequence[SuperWeightTarget], originals: Sequence[float]
) -> Iterator[None]:
    """Hooks that write the super activation back while the super weights are zeroed (``sw_restore``)."""
    missing = [str(sw) for sw in sws if sw.activation_cutoff is None]
    if missing:
        raise AttackError(
            f"mode sw_restore needs the super activation's cutoff of {', '.join(missing)} "
            "(set_activation_cutoffs measures it on the probe input)"
        )
    per_row: dict[tuple[int, int], list[tuple[int, float, float]]] = {}
    for sw, w in zip(sws, originals):
        per_row.setdefault((sw.layer, sw.row), []).append((sw.col, w, sw.activation_cutoff))
    handles, inputs = [], {}
    for (layer, row), entries in per_row.items():
        down = blocks[layer].down
        cols = [c for c, _, _ in entries]
        weights = torch.tensor([w for _, w, _ in entries])
        cutoff = min(c for _, _, c in entries)

        def pre(module, args, key=(layer, row)):
            inputs[key] = args[0]

        def post(module, args, output, key=(layer, row), cols=cols, weights=weights, cutoff=cutoff):
            x, out = inputs.pop(key), first_tensor(output)
            lost = (x[..., cols].float() * weights.to(x.device)).sum(-1)  # what the zeroed weights wrote
            original = out[..., key[1]].float() + lost
            where = original.abs() > cutoff
            out[..., key[1]] = torch.where(where, original.to(out.dtype), out[..., key[1]])
            return output

        handles += [down.register_forward_pre_hook(pre), down.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def set_activation_cutoffs(
    model: nn.Module,
    input_ids,
    sws: Sequence[SuperWeightTarget],
    blocks: Optional[Sequence[FFNBlock]] = None,
    relative: float = 0.5,
) -> None:
    """Set each super weight's ``activation_cutoff`` to ``relative`` x the largest |down output|
    in its row over ``input_ids`` (one probe forward): the super activation stands orders of
    magnitude above the rest of its row, so half of it separates it from everything else."""
    from ...core.probing import as_batch, forward_with_hooks, per_position

    by_index = {b.index: b for b in (blocks if blocks is not None else find_ffn_blocks(model))}
    check_super_weights(by_index, sws)
    peak: dict[tuple[int, int], float] = {}

    def register():
        handles = []
        for layer in {sw.layer for sw in sws}:
            rows = sorted({sw.row for sw in sws if sw.layer == layer})

            def hook(module, args, output, layer=layer, rows=rows):
                out = per_position(first_tensor(output)).float()
                for r in rows:
                    peak[(layer, r)] = float(out[:, r].abs().max())

            handles.append(by_index[layer].down.register_forward_hook(hook))
        return handles

    forward_with_hooks(model, as_batch(model, input_ids), register)
    for sw in sws:
        sw.activation_cutoff = relative * peak[(sw.layer, sw.row)]


def super_weight_targets(
    model: nn.Module, input_ids, which: str = "first", blocks: Optional[Sequence[FFNBlock]] = None
) -> list[SuperWeightTarget]:
    """``first``: the first candidate that creates the massive activation (what ``super_weight_target``
    returns); ``all``: every candidate of ``macdrop superweight`` (default rule), in its order."""
    if which == "first":
        sw = super_weight_target(model, input_ids, blocks)
        return [sw] if sw is not None else []
    if which != "all":
        raise AttackError(f"--super-weight {which!r} is not allowed: give LAYER,ROW,COL (repeatable) or all")
    return [
        SuperWeightTarget(c.layer, c.row, c.col) for c in find_super_weights(model, input_ids, blocks=blocks).candidates
    ]
