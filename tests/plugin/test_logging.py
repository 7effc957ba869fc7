"""Where a run's macdrop_p can be read besides trainer_state.json: TensorBoard's event file
(``report_to: tensorboard``), LLaMA-Factory's ``trainer_log.jsonl`` and LlamaBoard's running log
and loss plot. One run of LLaMA-Factory's own run_exp in LlamaBoard mode (the environment the web
UI gives ``llamafactory-cli train``); the reference is the per-step macdrop_p HF's Trainer wrote
into trainer_state.json."""

import json
import logging
import signal

import pytest
from helpers import tiny

pytest.importorskip("tensorboard")

LOGGERS = ("llamafactory", "transformers", "llamafactory_macdrop")  # where LlamaBoard mode attaches its handler


@pytest.fixture
def llamaboard_mode(monkeypatch, tmp_path):
    """LlamaBoard's environment for one run, and afterwards the handlers and SIGABRT handler its
    LogCallback installs in this process taken away again (the rest of the session must not log
    into this run's running_log.txt)."""
    before = {name: list(logging.getLogger(name).handlers) for name in LOGGERS}
    abort = signal.getsignal(signal.SIGABRT)
    monkeypatch.setenv("LLAMABOARD_ENABLED", "1")
    monkeypatch.setenv("LLAMABOARD_WORKDIR", str(tmp_path / "out"))
    yield tmp_path / "out"
    added = set()
    for name in LOGGERS:
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if h not in before[name]]:
            log.removeHandler(handler)
            added.add(handler)
    for handler in added:
        handler.close()
    signal.signal(signal.SIGABRT, abort)


def test_macdrop_p_reaches_tensorboard_trainer_log_and_llamaboard(
    tiny_llama_dir, tiny_data_dir, tmp_path, monkeypatch, llamaboard_mode
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llamafactory_macdrop.plugin import integration

    out = llamaboard_mode
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5: no logging_dir argument
    args = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, report_to="tensorboard", num_train_epochs=1)
    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args)

    state = json.loads((out / "trainer_state.json").read_text())
    expected = {h["step"]: h["macdrop_p"] for h in state["log_history"] if "macdrop_p" in h}
    assert len(expected) == state["max_steps"] >= 2
    assert len(set(expected.values())) > 1

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "train/macdrop_p" in events.Tags()["scalars"]
    board = {e.step: e.value for e in events.Scalars("train/macdrop_p")}
    assert board == pytest.approx(expected, abs=1e-6)  # float32 in the event file

    # the dropped share of the target rows' elements, per logged step: about p (binomial), exactly 0 at p = 0
    assert "train/macdrop_dropped" in events.Tags()["scalars"]
    dropped = {e.step: e.value for e in events.Scalars("train/macdrop_dropped")}
    assert dropped.keys() == expected.keys()
    elements = 5 * 64  # k rows x hidden of the planted model, one shared mask for gate and up
    for step, p in expected.items():
        assert abs(dropped[step] - p) <= 4 * (p * (1 - p) / elements) ** 0.5 + 1e-6, (step, p, dropped[step])
    assert dropped[max(expected)] == 0.0 and expected[max(expected)] == 0.0  # the step curriculum's last step
    # where MacDrop drops, recorded once in the run's config (TensorBoard's text panel)
    (text,) = [t for t in events.Tags()["tensors"] if t.startswith("macdrop/located")]
    recorded = json.loads(events.Tensors(text)[0].tensor_proto.string_val[0].decode())
    located = json.loads((out / "macdrop_locator.json").read_text())
    assert (recorded["macdrop_layer"], recorded["macdrop_rows"]) == (located["layer"], located["indices"])
    assert recorded["macdrop_probe_token_id"] == located["probe_token_id"]

    entries = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    logged = {e["current_steps"]: e["macdrop_p"] for e in entries if "macdrop_p" in e}
    assert logged == expected

    running = (out / "running_log.txt").read_text()
    for step, p in expected.items():
        assert f"step {step}: macdrop_p {p:.4f}" in running
    assert "massive layer: 1" in running  # the plugin's own lines reach LlamaBoard too

    from llamafactory.extras.ploting import gen_loss_plot

    fig = gen_loss_plot(entries)
    lines = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "macdrop_p"]
    assert len(lines) == 1
    assert dict(zip(lines[0].get_xdata(), lines[0].get_ydata())) == pytest.approx(expected)
