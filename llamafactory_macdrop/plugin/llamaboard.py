"""What LlamaBoard (``llamafactory-cli webui``) and ``trainer_log.jsonl`` show of a MacDrop run.

LlamaBoard starts ``llamafactory-cli train`` with the Train tab's settings (the "Extra arguments"
JSON included, so ``macdrop_*`` keys reach the launcher wrapper like YAML keys) and then follows
the run through two files in its output folder, both written by LLaMA-Factory's ``LogCallback``:

* ``running_log.txt``: LogCallback attaches a ``LoggerHandler`` to LLaMA-Factory's and
  transformers' loggers only; this plugin's logger does not propagate (its lines would print
  twice), so the handler is attached to it too, and each logged step adds a ``macdrop_p`` line;
* ``trainer_log.jsonl``: LogCallback writes a fixed set of keys (loss, lr, epoch, ...), so
  ``macdrop_p`` is added to each entry; LlamaBoard's loss plot (``gen_loss_plot``) draws it on a
  second axis.

Nothing here imports LLaMA-Factory: :mod:`.integration` hands over the class and module it patches.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

KEY = "macdrop_p"
LOGGER = "llamafactory_macdrop"
_PATCHED = "__macdrop_patched__"


def patch_log_callback(cls: type) -> None:
    """Wrap ``LogCallback.__init__`` (share its LlamaBoard handler) and ``on_log`` (add ``macdrop_p``)."""
    init, on_log = cls.__init__, cls.on_log
    if getattr(on_log, _PATCHED, False):
        return

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        handler = getattr(self, "logger_handler", None)  # set in LlamaBoard mode only
        logger = logging.getLogger(LOGGER)
        if handler is not None and handler not in logger.handlers:
            for old in [h for h in logger.handlers if type(h) is type(handler)]:
                logger.removeHandler(old)  # an earlier run's (a notebook): its running_log is not this run's
            logger.addHandler(handler)

    @functools.wraps(on_log)
    def on_log_with_p(self, args, state, control, **kwargs):
        p = state.log_history[-1].get(KEY) if state.log_history else None
        pool = getattr(self, "thread_pool", None)
        if p is None or pool is None:
            if p is not None and getattr(args, "should_save", False):
                _warn_once(self, "its thread_pool")  # LogCallback writes through it on the saving rank
            return on_log(self, args, state, control, **kwargs)
        submit, written = pool.submit, []

        def submit_with_p(fn, *fn_args, **fn_kwargs):  # LogCallback submits _write_log(output_dir, logs)
            logs = fn_args[-1] if fn_args else fn_kwargs.get("logs")
            if isinstance(logs, dict):
                logs.setdefault(KEY, p)
                written.append(True)
            return submit(fn, *fn_args, **fn_kwargs)

        pool.submit = submit_with_p
        try:
            result = on_log(self, args, state, control, **kwargs)
        finally:
            del pool.submit
        if not written and getattr(args, "should_save", False):
            _warn_once(self, "a logs dict submitted to its thread pool")
        if getattr(self, "webui_mode", False):
            logging.getLogger(LOGGER).info(f"step {state.global_step}: macdrop_p {p:.4f}")
        return result

    setattr(on_log_with_p, _PATCHED, True)
    cls.__init__ = __init__
    cls.on_log = on_log_with_p


def _warn_once(callback, missing: str) -> None:
    """LLaMA-Factory's LogCallback changed: trainer_log.jsonl (and LlamaBoard's plot) lose macdrop_p."""
    if getattr(callback, "_macdrop_warned", False):
        return
    callback._macdrop_warned = True
    logging.getLogger(LOGGER).warning(
        f"LLaMA-Factory's LogCallback has no {missing} (it changed since 0.9.5): macdrop_p is missing from "
        "trainer_log.jsonl and LlamaBoard's plot; it is still in trainer_state.json and every report_to backend"
    )


def patch_loss_plot(ploting) -> None:
    """Wrap ``gen_loss_plot``: the LlamaBoard loss figure gets ``macdrop_p`` on a second axis.

    Patched when ``llamafactory.extras.ploting`` loads, before ``llamafactory.webui.control``
    imports the name."""
    original = getattr(ploting, "gen_loss_plot", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def gen_loss_plot(trainer_log):
        fig = original(trainer_log)
        points = [(log["current_steps"], log[KEY]) for log in trainer_log if KEY in log and "current_steps" in log]
        if points and fig.axes:
            twin = fig.axes[0].twinx()
            twin.plot([s for s, _ in points], [p for _, p in points], color="tab:red", label=KEY)
            twin.set_ylabel(f"{KEY} (MacDrop dropout probability)", color="tab:red")
            twin.set_ylim(-0.02, 1.02)
            twin.legend(loc="upper center")
        return fig

    setattr(gen_loss_plot, _PATCHED, True)
    ploting.gen_loss_plot = gen_loss_plot
