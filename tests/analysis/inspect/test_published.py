"""analysis/inspect/published.py: the packaged table, the config matcher, the comparison rule, user files.

Every expected value below is written out from the papers / REFERENCE.md (House of Cards Table 6,
paper layers 1-based; LLMSuperWeight's coordinates, layers 0-based) and from real config.json
files; none is read back from the module's data.
"""

import itertools
import json

import pytest

from llamafactory_macdrop.analysis.inspect.published import (
    Comparison,
    PublishedFileError,
    compare_massive,
    compare_super_weights,
    load_published,
    match_config,
    matching_entries,
    to_zero_based,
)

# --- real config.json contents (the fields that matter; extra fields as the files have them) ---

#: meta-llama/Meta-Llama-3-8B (copy: huggingface.co/pandyamarut/Meta-Llama-3-8B)
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
#: meta-llama/Llama-3.1-8B (copy: huggingface.co/NbAiLab/nb-llama-3.1-8B)
LLAMA_3_1_8B = {
    **LLAMA_3_8B,
    "max_position_embeddings": 131072,
    "head_dim": 128,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
#: mistralai/Mistral-7B-v0.1
MISTRAL_V01 = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}
#: mistralai/Mistral-7B-v0.3 (copy: huggingface.co/unsloth/mistral-7b-v0.3)
MISTRAL_V03 = {**MISTRAL_V01, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32768}
#: mistralai/Mistral-7B-(Instruct-)v0.2: the v0.1 shape and vocabulary, rope_theta 1e6
MISTRAL_V02 = {**MISTRAL_V01, "rope_theta": 1000000.0, "sliding_window": None}
#: microsoft/Phi-3-mini-4k-instruct
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "vocab_size": 32064,
}
#: microsoft/Phi-3-mini-128k-instruct: same shape, long context
PHI3_MINI_128K = {
    **PHI3_MINI_4K,
    "max_position_embeddings": 131072,
    "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]},
}
#: huggyllama/llama-7b (transformers 4.28: no num_key_value_heads)
LLAMA_1_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "max_sequence_length": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}
#: meta-llama/Llama-2-7b-hf
LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}
#: google/gemma-2-9b
GEMMA_2_9B = {
    "architectures": ["Gemma2ForCausalLM"],
    "head_dim": 256,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
}
#: mistralai/Mixtral-8x7B-v0.1
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "vocab_size": 32000,
}
#: allenai/OLMo-1B-0724-hf
OLMO_1B_0724 = {
    "architectures": ["OlmoForCausalLM"],
    "clip_qkv": 8.0,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "olmo",
    "num_attention_heads": 16,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "rope_theta": 10000.0,
    "vocab_size": 50304,
}

# --- the published facts, written out (House of Cards Table 6: paper layer 1-based) ---
LLAMA_3_8B_TOP5 = [2427, 198, 6412, 12657, 591]
HOC = {  # model -> (paper layer, top-5, expert)
    "Llama-2-7b(-chat)-hf": (2, [7890, 10411, 1192, 8731, 5843], None),
    "Llama-2-13b(-chat)-hf": (4, [7678, 8811, 11371, 6619, 12281], None),
    "Meta-Llama-3-8B": (2, LLAMA_3_8B_TOP5, None),
    "Meta-Llama-3-70B": (4, [16581, 3590, 16039, 19670, 13266], None),
    "Llama-3.1-405B (8-bit)": (6, [11891, 30740, 2392, 36238, 12328], None),
    "Mistral-7B-v0.1": (2, [7310, 8572, 2514, 1878, 8693], None),
    "Mixtral-8x7B-v0.1": (2, [7310, 7530, 11981, 7492, 3178], 4),
    "Phi-3-mini-4k-instruct": (3, [808, 340, 3644, 2473, 2987], None),
    "Phi-3-medium-4k-instruct": (6, [181, 7540, 19, 15874, 5137], None),
}
SUPER = {  # model -> (layer 0-based, row, col); Phi-3-mini's rows as mengxiayu/LLMSuperWeight lists them
    "Llama-7B (LLaMA-1, huggyllama/llama-7b)": [[2, 3968, 7003]],
    "Llama-2-7b(-chat)-hf": [[1, 2533, 7890]],
    "Llama-2-13b(-chat)-hf": [[3, 4743, 7678]],
    "Mistral-7B-v0.1": [[1, 2070, 7310]],
    "OLMo-1B-0724-hf": [[1, 1764, 1710], [2, 1764, 8041]],
    "Meta-Llama-3-8B": [[1, 788, 2427], [1, 1384, 2427], [1, 4062, 2427]],
}


@pytest.fixture(scope="module")
def packaged():
    return load_published()


def by_model(entries, name):
    (entry,) = [e for e in entries if e.model == name]
    return entry


@pytest.mark.parametrize(
    "config, model",
    [
        (LLAMA_3_8B, "Meta-Llama-3-8B"),
        (MISTRAL_V01, "Mistral-7B-v0.1"),
        (PHI3_MINI_4K, "Phi-3-mini-4k-instruct"),
        (LLAMA_2_7B, "Llama-2-7b(-chat)-hf"),
        (LLAMA_1_7B, "Llama-7B (LLaMA-1, huggyllama/llama-7b)"),
        (MIXTRAL, "Mixtral-8x7B-v0.1"),
        (OLMO_1B_0724, "OLMo-1B-0724-hf"),
        (GEMMA_2_9B, "gemma-2-9b"),
    ],
)
def test_real_configs_find_their_entry(packaged, config, model):
    assert [e.model for e in matching_entries(config, packaged)] == [model]
    assert match_config(config).model == model  # the packaged table by default


@pytest.mark.parametrize(
    "config, not_this",
    [
        (LLAMA_3_1_8B, "Meta-Llama-3-8B"),
        (MISTRAL_V03, "Mistral-7B-v0.1"),
        (MISTRAL_V02, "Mistral-7B-v0.1"),
        (PHI3_MINI_128K, "Phi-3-mini-4k-instruct"),
    ],
)
def test_a_later_version_of_the_same_shape_is_not_matched(packaged, config, not_this):
    assert not_this not in [e.model for e in matching_entries(config, packaged)]
    assert match_config(config, packaged) is None


def test_name_plays_no_part_and_fields_may_sit_where_transformers_5_or_multimodal_configs_put_them(packaged):
    renamed = {**LLAMA_3_8B, "_name_or_path": "/data/my-renamed-folder", "architectures": ["Whatever"]}
    assert match_config(renamed, packaged).model == "Meta-Llama-3-8B"
    v5 = {k: v for k, v in LLAMA_3_8B.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert match_config(v5, packaged).model == "Meta-Llama-3-8B"
    llava = {"model_type": "llava", "text_config": MISTRAL_V01, "vision_config": {"model_type": "clip_vision_model"}}
    assert match_config(llava, packaged).model == "Mistral-7B-v0.1"
    integers = {**LLAMA_3_8B, "rope_theta": 500000}
    assert match_config(integers, packaged).model == "Meta-Llama-3-8B"
    missing = {k: v for k, v in LLAMA_3_8B.items() if k != "max_position_embeddings"}
    assert match_config(missing, packaged) is None


def test_the_packaged_positions_are_the_published_ones(packaged):
    for model, (paper_layer, top5, expert) in HOC.items():
        m = by_model(packaged, model).massive
        assert (m.layer, m.printed_layer, m.layer_base) == (paper_layer - 1, paper_layer, 1), model
        assert list(m.indices) == top5, model
        assert m.expert == expert, model
    for model, coords in SUPER.items():
        sw = by_model(packaged, model).super_weights
        assert sw.layer_base == 0, model
        assert [c.as_list() for c in sw.coordinates] == coords, model
    phi = by_model(packaged, "Phi-3-mini-4k-instruct").super_weights
    assert [(c.layer, c.col) for c in phi.coordinates][:3] == [(2, 808)] * 3
    for size in ("2b", "9b", "27b"):
        assert by_model(packaged, f"gemma-2-{size}").massive.none_reported


def test_every_entry_cites_its_sources(packaged):
    for e in packaged:
        assert e.config_sources, e.model
        assert all(s.strip() for s in e.config_sources), e.model
        for block in (e.massive, e.super_weights):
            if block is not None:
                assert block.source, e.model
                assert block.cite, e.model
                assert block.cite != block.source, e.model
    assert by_model(packaged, "Meta-Llama-3-8B").massive.source == "House of Cards Table 6"


def test_no_two_packaged_entries_can_match_one_config(packaged):
    # A config matches an entry when it holds all the entry's fields: two entries can share a
    # config exactly when they agree on every field both name. Each pair must disagree on one.
    for a, b in itertools.combinations(packaged, 2):
        shared = set(a.config) & set(b.config)
        assert any(a.config[k] != b.config[k] for k in shared), (a.model, b.model)
        assert not a.matches({**a.config, **b.config}) or not b.matches({**a.config, **b.config})
    for e in packaged:
        assert matching_entries(dict(e.config), packaged) == [e]


def test_massive_match_and_the_one_based_mistake(packaged):
    entry = match_config(LLAMA_3_8B, packaged)
    ok = compare_massive(entry, 1, LLAMA_3_8B_TOP5)
    assert isinstance(ok, Comparison)
    assert ok.matches
    assert ok.reported
    assert ok.message == (
        "matches the published position (House of Cards Table 6, Meta-Llama-3-8B: layer 2 "
        "1-based = 1 0-based, top-5 [2427, 198, 6412, 12657, 591]): layer 1, top-1 2427, "
        "5/5 of the top-5"
    )
    d = ok.to_dict()
    assert d["published"]["layer"] == 1
    assert d["published"]["paper_layer"] == 2
    assert d["published"]["indices"] == LLAMA_3_8B_TOP5
    assert d["matches"] is True
    assert d["overlap"] == 5
    assert d["overlap_of"] == 5
    json.dumps(d)

    wrong = compare_massive(entry, 2, LLAMA_3_8B_TOP5)
    assert not wrong.matches
    assert wrong.reported
    assert wrong.message.startswith("differs from the published position")
    assert "layer 2 1-based = 1 0-based" in wrong.message
    assert "located layer 2 (0-based)" in wrong.message
    assert "published layer 1 (0-based)" in wrong.message
    assert "\n" not in wrong.message

    # same layer, another top-1: differs; the overlap is reported, not required
    shuffled = compare_massive(entry, 1, [198, 2427, 6412, 12657, 591])
    assert not shuffled.matches
    assert shuffled.details["overlap"] == 5
    partial = compare_massive(entry, 1, [2427, 1, 2, 3, 4])
    assert partial.matches
    assert "1/5 of the top-5" in partial.message


def test_moe_needs_the_same_expert(packaged):
    entry = match_config(MIXTRAL, packaged)
    top5 = [7310, 7530, 11981, 7492, 3178]
    assert compare_massive(entry, 1, top5, expert=4).matches
    other = compare_massive(entry, 1, top5, expert=3)
    assert not other.matches
    assert "expert 3" in other.message
    assert "expert 4" in other.message
    assert not compare_massive(entry, 1, top5).matches


def test_gemma2_says_none_reported(packaged):
    entry = match_config(GEMMA_2_9B, packaged)
    c = compare_massive(entry, 5, [100, 200])
    assert not c.matches
    assert not c.reported
    assert "reports no massive weights for gemma-2-9b" in c.message
    assert c.to_dict()["published"]["none_reported"] is True
    assert not compare_super_weights(entry, [(1, 2, 3)]).reported


def test_super_weights_match_and_differ(packaged):
    llama2 = match_config(LLAMA_2_7B, packaged)
    assert compare_super_weights(llama2, [(1, 2533, 7890)]).matches
    assert compare_super_weights(llama2, [(11, 5, 9), (1, 2533, 7890)]).matches  # any located one
    off = compare_super_weights(llama2, [(2, 2533, 7890)])
    assert not off.matches
    assert "1-based" in off.message
    assert not compare_super_weights(llama2, [(1, 2534, 7890)]).matches  # the row is published: it counts
    wrong = compare_super_weights(llama2, [(3, 4743, 7678)])  # Llama-2-13B's
    assert not wrong.matches
    assert "(3, 4743, 7678)" in wrong.message
    assert "(1, 2533, 7890)" in wrong.message

    llama3 = match_config(LLAMA_3_8B, packaged)
    c = compare_super_weights(llama3, [(1, 1384, 2427)])
    assert c.matches
    assert c.to_dict()["found"] == [[1, 1384, 2427]]
    assert c.to_dict()["overlap_of"] == 3
    olmo = match_config(OLMO_1B_0724, packaged)
    assert compare_super_weights(olmo, [(2, 1764, 8041)]).matches


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def test_a_user_file_entry_matches_a_tiny_config(tmp_path, packaged):
    path = write(
        tmp_path,
        "mine.json",
        {
            "models": [
                {
                    "model": "tiny-llama (measured here)",
                    "config": TINY,
                    "massive": {"source": "my run", "layer": 1, "layer_base": 0, "indices": [13, 97]},
                    "super_weights": {"source": "my run", "layer_base": 1, "coordinates": [[2, None, 13]]},
                }
            ]
        },
    )
    entries = load_published([path])
    assert len(entries) == len(packaged) + 1
    entry = match_config({**TINY, "vocab_size": 256, "rope_theta": 10000.0}, entries)
    assert entry.model == "tiny-llama (measured here)"
    assert entry.origin == str(path)
    c = compare_massive(entry, 1, [13, 97])
    assert c.matches
    assert "my run, tiny-llama (measured here): layer 1 (0-based)" in c.message
    assert "paper_layer" not in c.to_dict()["published"]
    # a 1-based source, the row not given: layer 2 1-based is index 1, any row matches
    sw = compare_super_weights(entry, [(1, 40, 13)])
    assert sw.matches
    assert sw.to_dict()["published"]["paper_layers"] == [2]
    assert sw.to_dict()["published"]["super_weights"] == [[1, None, 13]]
    assert match_config(LLAMA_3_8B, entries).model == "Meta-Llama-3-8B"  # the packaged ones still there


def test_a_user_file_overrides_a_packaged_entry(tmp_path):
    path = write(
        tmp_path,
        "override.json",
        {
            "models": [
                {
                    "model": "my Llama-3-8B",
                    "config": {"model_type": "llama", "hidden_size": 4096, "vocab_size": 128256},
                    "massive": {"source": "my probe", "layer": 1, "layer_base": 0, "indices": [2427]},
                }
            ]
        },
    )
    entries = load_published([path])
    assert [e.model for e in matching_entries(LLAMA_3_8B, entries)] == ["Meta-Llama-3-8B", "my Llama-3-8B"]
    assert match_config(LLAMA_3_8B, entries).model == "my Llama-3-8B"


ENTRY = {"model": "m", "config": TINY, "massive": {"source": "s", "layer": 1, "layer_base": 0, "indices": [1, 2]}}


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "the top level must be an object"),
        ({"models": []}, "'models' must be a non-empty list"),
        ({"version": 2, "models": [ENTRY]}, "version 2 is not supported"),
        ({"models": [{**ENTRY, "model": ""}]}, "needs a non-empty 'model'"),
        ({"models": [{**ENTRY, "config": {}}]}, "'config' must be a non-empty object"),
        ({"models": [{**ENTRY, "config": {"hidden_size": [64]}}]}, "config field 'hidden_size'"),
        ({"models": [{"model": "m", "config": TINY}]}, "needs 'massive' and/or 'super_weights'"),
        ({"models": [{**ENTRY, "massive": {**ENTRY["massive"], "layer_base": 2}}]}, "'layer_base' must be 0"),
        ({"models": [{**ENTRY, "massive": {**ENTRY["massive"], "layer_bse": 0}}]}, "unknown key 'layer_bse'"),
        ({"models": [{**ENTRY, "massive": {**ENTRY["massive"], "indices": ["13"]}}]}, "'indices' must be"),
        ({"models": [{**ENTRY, "massive": {**ENTRY["massive"], "indices": [500]}}]}, "index 500 is outside 0..127"),
        ({"models": [{**ENTRY, "massive": {**ENTRY["massive"], "layer": 2}}]}, "beyond num_hidden_layers 2"),
        ({"models": [{**ENTRY, "massive": {**ENTRY["massive"], "layer": 0, "layer_base": 1}}]}, "does not exist"),
        ({"models": [{**ENTRY, "massive": {"layer": 1, "layer_base": 0, "indices": [1]}}]}, "needs a 'source'"),
        ({"models": [{**ENTRY, "massive": {"source": "s", "none_reported": True, "layer": 1}}]}, "excludes layer"),
        (
            {
                "models": [
                    {
                        "model": "m",
                        "config": TINY,
                        "super_weights": {"source": "s", "layer_base": 0, "coordinates": [[1, 5]]},
                    }
                ]
            },
            "coordinates[0] must be [layer, row or null, col]",
        ),
        (
            {
                "models": [
                    {
                        "model": "m",
                        "config": TINY,
                        "super_weights": {"source": "s", "layer_base": 0, "coordinates": [[1, 64, 5]]},
                    }
                ]
            },
            "row 64 is outside 0..63",
        ),
    ],
)
def test_a_malformed_user_file_gives_one_clear_line(tmp_path, content, fragment):
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(PublishedFileError) as info:
        load_published([path])
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert "\n" not in message


def test_a_missing_user_file_names_itself(tmp_path):
    with pytest.raises(PublishedFileError, match="nope.json: cannot read it"):
        load_published([tmp_path / "nope.json"])


def test_one_conversion_of_layer_numbers():
    assert to_zero_based(2, 1) == 1
    assert to_zero_based(1, 0) == 1


def test_the_user_file_example_in_the_docs_loads(tmp_path):
    from helpers.process import REPO

    text = (REPO / "docs" / "locator.md").read_text()
    section = text.split("## Published positions", 1)[1]
    example = section.split("```json", 1)[1].split("```", 1)[0]
    path = write(tmp_path, "example.json", example)
    smollm2 = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
    }
    entry = match_config(smollm2, load_published([path]))
    assert entry.model == "SmolLM2-135M-Instruct"
    assert compare_massive(entry, 11, [1229, 1487, 874, 926, 1010]).matches
    assert compare_super_weights(entry, [(11, 507, 1229)]).matches
