import pytest

from llamafactory_macdrop.plugin.keys import (
    MacDropConfig,
    MacDropConfigError,
    split_macdrop_args,
)


def test_defaults_match_the_paper_recommendation():
    cfg = MacDropConfig()
    assert (cfg.macdrop, cfg.macdrop_k, cfg.macdrop_p0, cfg.macdrop_curriculum) == (False, 5, 0.8, "step")
    assert (cfg.macdrop_alpha, cfg.macdrop_scope, cfg.macdrop_layer, cfg.macdrop_indices) == (
        0.01,
        "massive",
        None,
        None,
    )
    assert cfg.macdrop_mask_per == "optimizer_step"  # one mask per optimizer step, however the batch is split
    assert MacDropConfig.from_raw({"macdrop_mask_per": "micro_batch"}).macdrop_mask_per == "micro_batch"


def test_yaml_and_command_line_values_are_coerced():
    yaml_cfg = MacDropConfig.from_raw({"macdrop": True, "macdrop_k": 3, "macdrop_p0": 0.5, "macdrop_indices": None})
    cli_cfg = MacDropConfig.from_raw(
        {"macdrop": "true", "macdrop_k": "3", "macdrop_p0": "0.5", "macdrop_indices": "null"}
    )
    assert yaml_cfg == cli_cfg
    cfg = MacDropConfig.from_raw({"macdrop_indices": "1229, 1487", "macdrop_layer": "11"})
    assert cfg.macdrop_indices == (1229, 1487)
    assert cfg.macdrop_layer == 11
    assert cfg.macdrop_k == 2
    assert MacDropConfig.from_raw({"macdrop_indices": [7, 3, 9]}).macdrop_indices == (7, 3, 9)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"macdrop_k": 0}, "macdrop_k=0"),
        ({"macdrop_k": 2.5}, "macdrop_k=2.5"),
        ({"macdrop_k": True}, "macdrop_k=True"),
        ({"macdrop_p0": 1.5}, "macdrop_p0=1.5"),
        ({"macdrop_p0": -0.1}, "macdrop_p0=-0.1"),
        ({"macdrop_p0": "high"}, "macdrop_p0='high'"),
        ({"macdrop_alpha": 0}, "macdrop_alpha=0.0"),
        ({"macdrop_alpha": float("inf")}, "macdrop_alpha=inf"),
        ({"macdrop_curriculum": "linear"}, "macdrop_curriculum='linear'"),
        ({"macdrop_scope": "everything"}, "macdrop_scope='everything'"),
        ({"macdrop_layer": -1}, "macdrop_layer=-1"),
        ({"macdrop_indices": [3, 3]}, "duplicates"),
        ({"macdrop_indices": [-2]}, "macdrop_indices=[-2]"),
        ({"macdrop_indices": []}, "macdrop_indices=[]"),
        ({"macdrop": "maybe"}, "macdrop='maybe'"),
        (
            {"macdrop_mask_per": "step"},
            "macdrop_mask_per='step' is not allowed: expected one of optimizer_step, micro_batch",
        ),
        ({"macdrop_k": 4, "macdrop_indices": [1, 2]}, "macdrop_k=4 disagrees"),
    ],
)
def test_bad_values_fail_with_one_line_naming_key_and_value(raw, fragment):
    with pytest.raises(MacDropConfigError) as info:
        MacDropConfig.from_raw(raw)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_probe_token_is_an_id_or_a_text():
    assert MacDropConfig.from_raw({"macdrop_probe_token": 5}).macdrop_probe_token == 5
    assert MacDropConfig.from_raw({"macdrop_probe_token": "5"}).macdrop_probe_token == 5
    assert MacDropConfig.from_raw({"macdrop_probe_token": "<|endoftext|>"}).macdrop_probe_token == "<|endoftext|>"
    assert MacDropConfig.from_raw({"macdrop_probe_token": "null"}).macdrop_probe_token is None
    for bad in (-3, True, [1]):
        with pytest.raises(MacDropConfigError, match="macdrop_probe_token="):
            MacDropConfig.from_raw({"macdrop_probe_token": bad})


def test_curriculum_typo_gets_a_suggestion():
    with pytest.raises(MacDropConfigError, match="did you mean 'epoch_after'"):
        MacDropConfig.from_raw({"macdrop_curriculum": "epoch_afer"})


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(MacDropConfigError) as info:
        MacDropConfig.from_raw({"macdrop_p": 0.5})
    assert "unknown key 'macdrop_p'" in str(info.value)
    assert "did you mean 'macdrop_p0'" in str(info.value)
    with pytest.raises(MacDropConfigError, match="did you mean 'macdrop_curriculum'"):
        MacDropConfig.from_raw({"macdrop_curiculum": "step"})


def test_split_dict_leaves_other_keys_and_input_untouched():
    args = {"model_name_or_path": "m", "macdrop": True, "macdrop_k": 3, "lora_rank": 8}
    rest, raw = split_macdrop_args(args)
    assert rest == {"model_name_or_path": "m", "lora_rank": 8}
    assert raw == {"macdrop": True, "macdrop_k": 3}
    assert "macdrop" in args  # not mutated


def test_split_command_line_forms():
    argv = ["--model_name_or_path", "m", "--macdrop", "--macdrop_k", "3", "--macdrop_p0=0.5", "--do_train", "true"]
    rest, raw = split_macdrop_args(argv)
    assert rest == ["--model_name_or_path", "m", "--do_train", "true"]
    assert raw == {"macdrop": "true", "macdrop_k": "3", "macdrop_p0": "0.5"}
    assert MacDropConfig.from_raw(raw) == MacDropConfig(macdrop=True, macdrop_k=3, macdrop_p0=0.5)


def test_key_reference_covers_every_field():
    keys = [row[0] for row in MacDropConfig.key_reference()]
    assert keys == list(MacDropConfig().to_dict())
