"""What an attacked model says: greedy generation under each attack setting, on one load.

Why: perplexity says that zeroing the top-k massive weights breaks a model; the text shows how
(House of Cards, Fig. 1b: the zeroed model stops producing sensible text, the one that keeps
only those rows still answers). Every setting is applied in place by the same
:class:`~.attacks.ModelAttacker` the sweep uses, the prompt is continued greedily, and the
weights are checked bit for bit after each setting.

Greedy means: at every step the arg-max token of the last position's logits, until an end token
(the tokenizer's EOS and the model's ``generation_config.eos_token_id``) or ``max_new_tokens``.
The loop is written out (with the KV cache) rather than delegated to ``generate`` so that no
``generation_config`` default (sampling, repetition penalty, ...) can change what "greedy" means.

Which settings generate (``--generate-settings``, :func:`select_settings`): comma-separated
entries, each either a setting's label as the table prints it (``zero k=5``, ``superweight x0``,
``activation := mean``) or a filter ``MODE[:VALUE]``: ``zero`` / ``retain`` (every k of the run)
or ``zero:5``; ``superweight`` or ``superweight:0`` (the scale); ``activation`` or
``activation:mean`` (the fill); ``all``. The clean model (``clean``) always generates first.
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ...core.probing import as_batch, unwrap_peft
from ...core.text_prefix import resolve_prefix
from ...core.values import comma_list
from .attacks import ATTACK_MODES, AttackError, AttackSetting, ModelAttacker


@dataclass
class Generation:
    """One setting's continuation of the prompt (JSON ``generations``; the clean model is mode ``clean``)."""

    setting: str
    mode: str
    k: int
    text: str
    new_tokens: int
    stopped: str  # "eos" or "max_new_tokens"
    scale: Optional[float] = None
    fill: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


# ----------------------------------------------------------------------------- choosing settings
def _check_value(entry: str, mode: str, value: str) -> None:
    """MODE:VALUE with a VALUE of the mode's kind (k an integer, a scale a number, a fill zero|mean)."""
    if mode in ("zero", "retain") and not value.strip().isdigit():
        raise AttackError(
            f"--generate-settings {entry!r}: {value!r} is not an integer (the k of {mode}, e.g. {mode}:5)"
        )
    if mode == "superweight":
        try:
            float(value)
        except ValueError:
            raise AttackError(
                f"--generate-settings {entry!r}: {value!r} is not a number (the scale, e.g. superweight:0)"
            ) from None
    if mode == "activation" and value not in ("zero", "mean"):
        raise AttackError(
            f"--generate-settings {entry!r}: {value!r} is not a fill (zero or mean, e.g. activation:mean)"
        )


def _matches(setting: AttackSetting, entry: str) -> bool:
    if entry == "all" or entry == setting.label:
        return True
    mode, _, value = entry.partition(":")
    if mode != setting.mode:
        return False
    if not value:
        return True
    if mode in ("zero", "retain"):
        return value.isdigit() and int(value) == setting.k
    if mode == "superweight":
        try:
            return float(value) == setting.scale
        except ValueError:
            return False
    return value == setting.fill


def select_settings(settings: Sequence[AttackSetting], spec: Optional[str]) -> list[AttackSetting]:
    """The settings of the run that generate (see the module docstring); ``clean`` always first.
    Refuses an entry that names no setting of the run, listing what the run has."""
    if spec is None or not spec.strip():
        return list(settings)
    entries = comma_list(spec)
    labels = ", ".join(s.label for s in settings)
    for entry in entries:
        mode, _, value = entry.partition(":")
        if entry != "all" and mode not in ("clean", *ATTACK_MODES) and not any(entry == s.label for s in settings):
            raise AttackError(
                f"--generate-settings {entry!r} is not allowed: give a setting label ({labels}) or "
                f"MODE[:VALUE] with MODE one of {', '.join(ATTACK_MODES)}"
            )
        if value and not any(entry == s.label for s in settings):
            _check_value(entry, mode, value)
        if not any(_matches(s, entry) for s in settings):
            raise AttackError(f"--generate-settings {entry!r} matches no setting of this run (settings: {labels})")
    chosen = [s for s in settings if s.mode == "clean" or any(_matches(s, e) for e in entries)]
    return chosen


# ----------------------------------------------------------------------------- generating
def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> tuple[list[int], bool]:
    """The prompt's token ids and whether the chat template was applied (only when asked and the
    tokenizer has one; a single user turn plus the generation prompt). Without it, what the
    tokenizer puts before a text (core/text_prefix.py) + the prompt's tokens: no appended EOS,
    which would end the text the model is asked to continue."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        return [int(i) for i in encoded], True
    return resolve_prefix(tokenizer).apply(tokenizer(prompt, add_special_tokens=False)["input_ids"]), False


def end_tokens(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's generation EOS(s)."""
    found = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(unwrap_peft(model), "generation_config", None), "eos_token_id", None),
    ):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and not isinstance(token, bool):
                found.add(token)
    return found


@torch.no_grad()
def greedy_generate(
    model: nn.Module, input_ids: Sequence[int], max_new_tokens: int, stop: set[int]
) -> tuple[list[int], str]:
    """Arg-max decoding with the KV cache; returns the new token ids (an end token included) and
    why it stopped. Eval mode during the loop; the training flag is restored."""
    ids = as_batch(model, list(input_ids))
    was_training = model.training
    model.eval()
    new: list[int] = []
    try:
        out = model(input_ids=ids, use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            if token in stop:
                return new, "eos"
            out = model(
                input_ids=torch.tensor([[token]], device=ids.device),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    finally:
        model.train(was_training)
    return new, "max_new_tokens"


def generate_under_attack(
    model: nn.Module,
    tokenizer: Any,
    attacker: ModelAttacker,
    settings: Sequence[AttackSetting],
    prompt: str,
    *,
    max_new_tokens: int = 40,
    chat_template: bool = True,
    echo: Optional[Callable[[str], None]] = None,
) -> list[Generation]:
    """Greedy continuation of ``prompt`` under every setting; the weights are verified bit for
    bit after each (:meth:`~.attacks.ModelAttacker.verify_restored` raises otherwise)."""
    ids, _ = prompt_ids(tokenizer, prompt, chat_template)
    stop = end_tokens(model, tokenizer)
    out = []
    for setting in settings:
        start = time.perf_counter()
        with attacker.applied(setting):
            new, why = greedy_generate(model, ids, max_new_tokens, stop)
        attacker.verify_restored()
        text = tokenizer.decode([t for t in new if t not in stop], skip_special_tokens=True)
        out.append(Generation(setting.label, setting.mode, setting.k, text, len(new), why, setting.scale, setting.fill))
        if echo:
            echo(f"  generate {setting.label:<22} {len(new)} tokens ({why}), {time.perf_counter() - start:.1f} s")
    return out


# ----------------------------------------------------------------------------- views
def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")


def generations_table(generations: Sequence[Generation]) -> str:
    """Markdown for the terminal: one line per setting (newlines shown as \\n)."""
    lines = ["| setting | generated text |", "|---|---|"]
    lines += [f"| {g.setting} | {_one_line(g.text)} |" for g in generations]
    return "\n".join(lines)


def generations_markdown(generations: Sequence[Generation], prompt: str, title: str) -> str:
    """A markdown page with the texts next to each other: one column per setting."""
    cells = [
        html.escape(g.text).replace("|", "&#124;").replace("\n", "<br>") or "<i>(nothing)</i>" for g in generations
    ]
    return "\n".join(
        [
            f"# {title}",
            "",
            f"Prompt: {prompt!r}",
            "",
            "| " + " | ".join(g.setting for g in generations) + " |",
            "|" + "---|" * len(generations),
            "| " + " | ".join(cells) + " |",
            "",
        ]
    )


def generations_html(generations: Sequence[Generation], prompt: str, title: str) -> str:
    """A standalone HTML page with one column per setting, side by side."""
    columns = "\n".join(
        f'<div class="col"><h2>{html.escape(g.setting)}</h2><pre>{html.escape(g.text)}</pre>'
        f'<p class="meta">{g.new_tokens} new tokens, stopped at {g.stopped}</p></div>'
        for g in generations
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>' + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;margin:1.5em}.row{display:flex;gap:1em;align-items:flex-start}"
        ".col{flex:1;min-width:12em;border:1px solid #ccc;border-radius:4px;padding:0 .8em}"
        "pre{white-space:pre-wrap;font-size:.9em}h2{font-size:1em}.meta{color:#777;font-size:.8em}"
        "</style></head><body>\n<h1>"
        + html.escape(title)
        + "</h1>\n<p>Prompt: <code>"
        + html.escape(prompt)
        + '</code></p>\n<div class="row">\n'
        + columns
        + "\n</div></body></html>\n"
    )


def write_generation_report(path: str | Path, generations: Sequence[Generation], prompt: str, title: str) -> Path:
    """``.md`` -> markdown, ``.html``/``.htm`` -> HTML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render = generations_html if path.suffix.lower() in (".html", ".htm") else generations_markdown
    path.write_text(render(generations, prompt, title))
    return path
