"""Resuming from a checkpoint: same p, same masks, same rows (from the run's JSON) as an
uninterrupted run; a JSON from another model is refused; other settings than the checkpoint's are
named in one warning."""

import json
import logging
from contextlib import contextmanager

import pytest
from helpers import tiny

from llamafactory_macdrop.core.locator import LocatorError
from llamafactory_macdrop.plugin import integration


def run(args):
    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args)
    return json.loads((__import__("pathlib").Path(args["output_dir"]) / "trainer_state.json").read_text())


def logged(state):
    return {h["step"]: (h["macdrop_p"], h["loss"]) for h in state["log_history"] if "macdrop_p" in h}


def test_resumed_run_continues_the_curriculum_and_the_masks(tiny_llama_dir, tiny_data_dir, tmp_path):
    base = dict(
        max_steps=6,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        save_strategy="steps",
        save_steps=3,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
        lr_scheduler_type="constant",
    )
    straight = logged(run(tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path / "a", **base)))

    out = tmp_path / "b"
    first = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, **{**base, "max_steps": 6})
    run(first)
    # make the saved JSON name other rows: a resumed run must use the file, not re-locate
    locator = json.loads((out / "macdrop_locator.json").read_text())
    locator["indices"] = [3, 4, 5, 6, 7]
    (out / "macdrop_locator.json").write_text(json.dumps(locator))
    resumed = logged(run({**first, "overwrite_output_dir": False, "resume_from_checkpoint": str(out / "checkpoint-3")}))
    assert json.loads((out / "macdrop_locator.json").read_text())["indices"] == [3, 4, 5, 6, 7]
    assert {t: p for t, (p, _) in resumed.items() if t > 3} == {t: p for t, (p, _) in straight.items() if t > 3}
    # other rows were dropped after the resume, so the losses of steps 4-6 differ from the straight run
    assert any(abs(resumed[t][1] - straight[t][1]) > 1e-6 for t in (4, 5, 6))


@pytest.mark.parametrize("mask_per", ["optimizer_step", "micro_batch"])
def test_resumed_run_with_straight_json_reproduces_the_losses(mask_per, tiny_llama_dir, tiny_data_dir, tmp_path):
    # gradient accumulation 2: both mask_per modes must re-draw every micro-batch's mask after the resume
    base = dict(
        max_steps=6,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        num_train_epochs=1,
        save_strategy="steps",
        save_steps=3,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
        lr_scheduler_type="constant",
        macdrop_mask_per=mask_per,
    )
    straight = logged(run(tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path / "a", **base)))
    out = tmp_path / "b"
    args = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, **base)
    run(args)
    resumed = logged(run({**args, "overwrite_output_dir": False, "resume_from_checkpoint": str(out / "checkpoint-3")}))
    for t in (4, 5, 6):  # same data order, same per-step masks: the same losses
        assert resumed[t][0] == straight[t][0]
        assert resumed[t][1] == pytest.approx(straight[t][1], rel=1e-4)


def test_a_json_from_another_model_is_refused(tiny_llama_dir, tiny_data_dir, tmp_path):
    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        tmp_path,
        max_steps=2,
        gradient_accumulation_steps=1,
        save_strategy="steps",
        save_steps=1,
    )
    run(args)
    locator = json.loads((tmp_path / "macdrop_locator.json").read_text())
    locator["model"] = "some/other-model"
    (tmp_path / "macdrop_locator.json").write_text(json.dumps(locator))
    with pytest.raises(LocatorError, match="was written for model 'some/other-model'"):
        run(
            {
                **args,
                "max_steps": 3,
                "overwrite_output_dir": False,
                "resume_from_checkpoint": str(tmp_path / "checkpoint-1"),
            }
        )


@contextmanager
def warnings_logged():
    """The plugin logger's warnings while the block runs (its console handler's stream is whatever
    sys.stderr was when it was made, so read the records themselves)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("llamafactory_macdrop")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def changed_settings(records):
    return [r.getMessage() for r in records if "other MacDrop settings" in r.getMessage()]


def test_resume_with_other_p0_or_curriculum_warns_naming_old_and_new(tiny_llama_dir, tiny_data_dir, tmp_path):
    """Each checkpoint records the MacDrop settings it was trained with (macdrop_settings.json); a
    resume whose settings give another p says so once, naming old and new, and trains on."""
    out = tmp_path / "out"
    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        out,
        max_steps=4,
        gradient_accumulation_steps=1,
        save_strategy="steps",
        save_steps=2,
        macdrop_p0=0.8,
        macdrop_curriculum="step",
    )
    run(args)
    saved = json.loads((out / "checkpoint-2" / "macdrop_settings.json").read_text())
    assert (saved["macdrop_p0"], saved["macdrop_curriculum"], saved["total_steps"]) == (0.8, "step", 4)
    resume = {**args, "overwrite_output_dir": False, "resume_from_checkpoint": str(out / "checkpoint-2")}
    prefix = f"resuming {out / 'checkpoint-2'} with other MacDrop settings than it was trained with: "

    with warnings_logged() as same:
        run(resume)  # the same settings: no word
    with warnings_logged() as other:
        state = run({**resume, "macdrop_p0": 0.5, "macdrop_curriculum": "constant"})
    with warnings_logged() as longer:
        run({**resume, "max_steps": 8})  # step's p counts the run's steps: a longer run changes it too
    assert changed_settings(same) == []
    assert changed_settings(other) == [
        prefix + "macdrop_p0 0.8 -> 0.5, macdrop_curriculum 'step' -> 'constant'; "
        "p at step 3 is 0.5 (the checkpoint's settings give 0.2)"
    ]
    assert logged(state)[3][0] == 0.5  # warned, not refused
    assert changed_settings(longer) == [
        prefix + "optimizer steps 4 -> 8; p at step 3 is 0.5 (the checkpoint's settings give 0.2)"
    ]


def test_resume_with_the_model_path_written_differently(tiny_llama_dir, tiny_data_dir, tmp_path):
    """The same folder written with a trailing '/' (or through a symlink) is the same model: the
    resume reuses the locator file instead of refusing it after the model loaded."""
    out = tmp_path / "out"
    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        out,
        max_steps=2,
        gradient_accumulation_steps=1,
        save_strategy="steps",
        save_steps=1,
    )
    run(args)
    written = json.loads((out / "macdrop_locator.json").read_text())
    link = tmp_path / "model_link"
    link.symlink_to(tiny_llama_dir)
    for spelled in (f"{tiny_llama_dir}/", str(link)):
        state = run(
            {
                **args,
                "model_name_or_path": spelled,
                "max_steps": 3,
                "overwrite_output_dir": False,
                "resume_from_checkpoint": str(out / "checkpoint-1"),
            }
        )
        assert state["global_step"] == 3
        assert json.loads((out / "macdrop_locator.json").read_text()) == written  # reused, not re-located


def test_resume_with_other_seed_or_probe_token_warns(tiny_llama_dir, tiny_data_dir, tmp_path):
    """The masks are drawn from the seed, and a resume reuses the located rows: a changed seed or
    probe token is named in the one warning, as p0 is."""
    out = tmp_path / "out"
    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        out,
        max_steps=4,
        gradient_accumulation_steps=1,
        save_strategy="steps",
        save_steps=2,
        seed=0,
    )
    run(args)
    assert json.loads((out / "checkpoint-2" / "macdrop_settings.json").read_text())["seed"] == 0
    resume = {**args, "overwrite_output_dir": False, "resume_from_checkpoint": str(out / "checkpoint-2")}
    with warnings_logged() as records:
        run({**resume, "seed": 7, "macdrop_probe_token": "the"})
    assert changed_settings(records) == [
        f"resuming {out / 'checkpoint-2'} with other MacDrop settings than it was trained with: "
        "seed 0 -> 7 (the masks are drawn from it: they differ from the interrupted run's from here on), "
        "macdrop_probe_token None -> 'the' (not used: the rows are reused from macdrop_locator.json); "
        "p at step 3 stays 0.2"
    ]
