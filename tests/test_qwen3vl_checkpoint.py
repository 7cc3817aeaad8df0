"""Qwen3-VL checkpoints (issue 13, step 1): the random-weight presets have a real release's
files and keys, transformers loads them strictly and runs an image through them, config.json
is read by key name, the family is told from config.json (dense and MoE Qwen3-VL served),
and the tensor checks name a damaged checkpoint tensor by tensor. No server
starts here.

The release facts below are those of Qwen/Qwen3-VL-2B/4B/8B-Instruct: file list, config.json
keys (4B's, written by transformers 4.57.0.dev0), the processor files' keys.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dvd.checkpoint import cli as checkpoint_cli
from dvd.checkpoint import load_config, make_checkpoint
from dvd.checkpoint.family import Family, checkpoint_family, require_servable
from dvd.checkpoint.qwen3vl_config import load_qwen3vl_config
from dvd.checkpoint.qwen3vl_presets import QWEN3VL_PRESETS
from dvd.checkpoint.qwen3vl_tokenizer import TOOLS_INTRO, TOOLS_OUTRO
from dvd.checkpoint.qwen3vl_verify import verify_qwen3vl
from dvd.checkpoint.qwen3vl_writer import release_config
from dvd.checkpoint.tokenizer import QWEN3_ADDED_TOKENS, REAL_FIRST_ADDED_ID, REGULAR_VOCAB
from dvd.checkpoint.verify import CheckpointMismatch

RELEASE_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
}
RELEASE_TOP_KEYS = {
    "architectures",
    "image_token_id",
    "model_type",
    "text_config",
    "tie_word_embeddings",
    "transformers_version",
    "video_token_id",
    "vision_config",
    "vision_end_token_id",
    "vision_start_token_id",
}
RELEASE_TEXT_KEYS = {
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "dtype",
    "eos_token_id",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "model_type",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_scaling",
    "rope_theta",
    "tie_word_embeddings",
    "use_cache",
    "vocab_size",
}
RELEASE_VISION_KEYS = {
    "deepstack_visual_indexes",
    "depth",
    "hidden_act",
    "hidden_size",
    "in_channels",
    "initializer_range",
    "intermediate_size",
    "model_type",
    "num_heads",
    "num_position_embeddings",
    "out_hidden_size",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
}
PROCESSOR_KEYS = {
    "image_mean",
    "image_std",
    "merge_size",
    "patch_size",
    "processor_class",
    "size",
    "temporal_patch_size",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3vl") / "qwen3vl-tiny", "qwen3vl-tiny")


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_config(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = _json(folder / "config.json")
    edit(raw)
    (folder / "config.json").write_text(json.dumps(raw))


def _tokenizer(path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --- the files and keys of a release -----------------------------------------------------


def test_the_preset_has_a_releases_files_and_keys(tiny: Path) -> None:
    assert {p.name for p in tiny.iterdir()} == RELEASE_FILES
    config = _json(tiny / "config.json")
    assert set(config) == RELEASE_TOP_KEYS
    assert set(config["text_config"]) == RELEASE_TEXT_KEYS
    assert set(config["vision_config"]) == RELEASE_VISION_KEYS
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert (config["model_type"], config["vision_config"]["model_type"]) == ("qwen3_vl", "qwen3_vl")
    assert config["text_config"]["rope_scaling"] == {
        "mrope_interleaved": True,
        "mrope_section": [6, 5, 5],
        "rope_type": "default",
    }
    vision = config["vision_config"]
    assert (vision["patch_size"], vision["temporal_patch_size"], vision["spatial_merge_size"]) == (
        16,
        2,
        2,
    )
    image = _json(tiny / "preprocessor_config.json")
    assert set(image) == PROCESSOR_KEYS | {"image_processor_type"}
    assert image["image_processor_type"] == "Qwen2VLImageProcessorFast"
    assert image["size"] == {"longest_edge": 16777216, "shortest_edge": 65536}
    video = _json(tiny / "video_preprocessor_config.json")
    assert set(video) == PROCESSOR_KEYS | {"video_processor_type"}
    assert video["size"] == {"longest_edge": 25165824, "shortest_edge": 4096}
    assert set(_json(tiny / "chat_template.json")) == {"chat_template"}
    generation = _json(tiny / "generation_config.json")
    assert generation["eos_token_id"] == [config["text_config"]["eos_token_id"], 512]
    assert (generation["top_k"], generation["top_p"], generation["temperature"]) == (20, 0.8, 0.7)


def test_transformers_reads_the_releases_config_as_the_model_was_built(tiny: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny)
    assert type(config).__name__ == "Qwen3VLConfig"
    assert config.vision_config.model_type == "qwen3_vl_vision"  # the releases' quirk, read
    rope = config.text_config.rope_parameters
    assert (rope["mrope_section"], rope["mrope_interleaved"], rope["rope_theta"]) == (
        [6, 5, 5],
        True,
        5_000_000,
    )
    assert config.vision_config.deepstack_visual_indexes == [0, 1, 2]
    assert config.tie_word_embeddings is False


def test_transformers_loads_strictly_and_runs_an_image(tiny: Path) -> None:
    """pixel_values come from the image processor the preprocessor_config.json names (the
    PIL fallback, torchvision being absent); AutoProcessor cannot load here because
    Qwen3VLVideoProcessor requires torchvision, so the prompt's <|image_pad|> is expanded
    as Qwen3VLProcessor.replace_image_token does: grid t*h*w / merge_size**2 tokens."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, Qwen3VLForConditionalGeneration

    model, info = Qwen3VLForConditionalGeneration.from_pretrained(tiny, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    image = Image.fromarray((np.arange(64 * 96 * 3).reshape(64, 96, 3) % 251).astype("uint8"))
    pixels = AutoImageProcessor.from_pretrained(tiny)(images=[image], return_tensors="pt")
    # 64x96 is below min_pixels (256^2): scaled by sqrt(65536 / 6144) and rounded up to
    # multiples of 32 (patch 16 x merge 2): 224 x 320 px, a 14 x 20 patch grid, 70 tokens.
    assert pixels["image_grid_thw"].tolist() == [[1, 14, 20]]
    assert tuple(pixels["pixel_values"].shape) == (14 * 20, 3 * 2 * 16 * 16)
    checkpoint = load_qwen3vl_config(tiny)
    tokens = checkpoint.tokens_of_grid(1, 14, 20)
    assert tokens == 70
    tokenizer = _tokenizer(tiny)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * tokens)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    mm_token_type_ids = (input_ids == checkpoint.image_token_id).int()
    assert int(mm_token_type_ids.sum()) == tokens
    with torch.no_grad():
        vision = model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        logits = model(
            input_ids=input_ids,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            mm_token_type_ids=mm_token_type_ids,
        ).logits
    rows = torch.cat([vision.pooler_output, *vision.deepstack_features], dim=-1)
    assert tuple(rows.shape) == (tokens, checkpoint.feature_width) == (70, 64 * 4)
    assert logits.shape == (1, input_ids.shape[1], checkpoint.llm_config["vocab_size"])
    assert torch.isfinite(logits).all()


# --- tokenizer and chat template ---------------------------------------------------------


def test_tokenizer_special_ids_are_the_configs_and_the_releases(tiny: Path) -> None:
    tokenizer = _tokenizer(tiny)
    config = _json(tiny / "config.json")
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    assert tokenizer.convert_tokens_to_ids(list(names)) == [config[key] for key in keys]
    # The real ids minus Qwen's first added id (151643) are the tiny ids minus 512:
    # <|vision_start|> 151652, <|vision_end|> 151653, <|image_pad|> 151655, <|video_pad|> 151656.
    real = (151655, 151656, 151652, 151653)
    assert [config[key] - REGULAR_VOCAB for key in keys] == [r - REAL_FIRST_ADDED_ID for r in real]
    for offset, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(content) == REGULAR_VOCAB + offset
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
    )
    assert len(tokenizer) == REGULAR_VOCAB + 26 <= config["text_config"]["vocab_size"]
    assert config["text_config"]["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(tokenizer("What is in the image?")["input_ids"]) == (
        "What is in the image?"
    )


IMAGE = {"type": "image", "image": "file:///a.png"}
VIDEO = {"type": "video", "video": "file:///a.mp4"}


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


@pytest.mark.parametrize(
    ("messages", "options", "expected"),
    [
        (  # an image message: no default system prompt, no newline after the image
            [{"role": "user", "content": [IMAGE, _text("What is in the picture?")]}],
            {},
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the "
            "picture?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (  # a video message after a system message given as parts
            [
                {"role": "system", "content": [_text("Be brief.")]},
                {"role": "user", "content": [VIDEO, _text("What happens?")]},
            ],
            {},
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            "<|video_pad|><|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n",
        ),
        (  # add_vision_id numbers images and videos across the whole chat
            [
                {"role": "user", "content": [IMAGE, VIDEO, _text("Compare.")]},
                {"role": "assistant", "content": "Same scene."},
                {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
            ],
            {"add_vision_id": True},
            "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Video 1: "
            "<|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n<|im_start|>"
            "assistant\nSame scene.<|im_end|>\n<|im_start|>user\nPicture 2: <|vision_start|>"
            "<|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n",
        ),
    ],
)
def test_chat_template_renders_as_the_releases(
    tiny: Path, messages: list[dict[str, Any]], options: dict[str, Any], expected: str
) -> None:
    tokenizer = _tokenizer(tiny)
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **options
    )
    assert rendered == expected
    # the processor's copy (chat_template.json) is the same template
    assert _json(tiny / "chat_template.json")["chat_template"] == tokenizer.chat_template


def test_chat_template_renders_tools_calls_and_responses(tiny: Path) -> None:
    tool = {"type": "function", "function": {"name": "zoom", "parameters": {}}}
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Zoom in."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "zoom", "arguments": {"factor": 2}}}],
        },
        {"role": "tool", "content": [IMAGE]},
        {"role": "tool", "content": "done"},
    ]
    rendered = _tokenizer(tiny).apply_chat_template(
        messages, tools=[tool], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nUse tools.\n\n"
        + TOOLS_INTRO
        + '\n{"type": "function", "function": {"name": "zoom", "parameters": {}}}'
        + TOOLS_OUTRO
        + "<|im_end|>\n<|im_start|>user\nZoom in.<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>\n"
        "</tool_response>\n<tool_response>\ndone\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert TOOLS_INTRO.startswith("# Tools\n\nYou may call one or more functions")
    assert TOOLS_OUTRO.endswith("<args-json-object>}\n</tool_call>")


# --- config.json by key name -------------------------------------------------------------


def test_load_qwen3vl_config_reads_the_values(tiny: Path) -> None:
    config = load_qwen3vl_config(tiny)
    preset = QWEN3VL_PRESETS["qwen3vl-tiny"]
    vision = config.vision
    assert config.family is Family.QWEN3_VL and not config.is_moe
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.out_hidden_size) == (
        4,
        64,
        2,
        64,
    )
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (16, 2, 2)
    assert vision.deepstack_visual_indexes == (0, 1, 2) and vision.merge_factor == 32
    assert config.feature_width == preset.feature_width == 64 * 4
    assert (config.image_token_id, config.video_token_id) == (524, 525)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (521, 522)
    assert config.tie_word_embeddings is False
    assert (config.mrope_section, config.rope_theta) == ((6, 5, 5), 5e6)
    assert config.llm_config["model_type"] == "qwen3"
    assert config.llm_config["architectures"] == ["Qwen3ForCausalLM"]
    assert config.llm_hidden_size == 64 and config.llm_config["num_hidden_layers"] == 3
    assert config.tokens_of_grid(2, 14, 20) == 140


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["vision_config"].pop("deepstack_visual_indexes"), "deepstack_visual_indexes"),
        (lambda c: c["vision_config"].pop("out_hidden_size"), "vision_config.out_hidden_size"),
        (lambda c: c.pop("image_token_id"), "'image_token_id' is missing"),
        (lambda c: c["text_config"].pop("head_dim"), "text_config.head_dim"),
        (lambda c: c["text_config"].pop("rope_scaling"), "text_config.rope_scaling"),
        (
            lambda c: c["text_config"]["rope_scaling"].pop("mrope_interleaved"),
            "mrope_interleaved",
        ),
        (
            lambda c: c["vision_config"].update(out_hidden_size=128),
            "out_hidden_size 128 is not text_config.hidden_size 64",
        ),
        (
            lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 1, 9]),
            "outside the 4-layer ViT",
        ),
        (lambda c: c["text_config"].update(num_hidden_layers=2), "3 DeepStack levels"),
        (lambda c: c.update(video_token_id=10**6), "outside text_config.vocab_size"),
    ],
)
def test_a_bad_config_names_the_key(tiny: Path, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_qwen3vl_config(folder)


def test_the_small_preset_builds_in_transformers() -> None:
    """Only the config (writing its weights takes seconds): the model class accepts it."""
    from transformers import Qwen3VLConfig

    from dvd.checkpoint.qwen3vl_tokenizer import qwen3vl_token_ids

    preset = QWEN3VL_PRESETS["qwen3vl-small"]
    config = Qwen3VLConfig.from_dict(release_config(preset, qwen3vl_token_ids()))
    assert config.text_config.hidden_size == config.vision_config.out_hidden_size == 512
    assert config.tie_word_embeddings is True  # as Qwen3-VL-2B
    # the docstring's balance: ViT weights x 4 patches per token vs LLM weights per token
    vit = preset.vit_depth * (4 * preset.vit_hidden**2 + 2 * preset.vit_hidden * 1024) * 4
    q, kv = preset.llm_heads * preset.llm_head_dim, preset.llm_kv_heads * preset.llm_head_dim
    h = preset.llm_hidden
    llm = preset.llm_layers * (2 * h * q + 2 * h * kv + 3 * h * preset.llm_intermediate)
    assert math.isclose(vit, llm, rel_tol=0.05)


MOE_TEXT_KEYS = (
    "decoder_sparse_step",
    "mlp_only_layers",
    "moe_intermediate_size",
    "norm_topk_prob",
    "num_experts",
    "num_experts_per_tok",
)


def test_the_moe_preset_has_the_moe_releases_keys_and_transformers_reads_them() -> None:
    """Only the config: the MoE preset's checkpoint is written and served in
    test_qwen3vl_moe_serving.py."""
    from transformers import Qwen3VLMoeConfig

    from dvd.checkpoint.qwen3vl_tokenizer import qwen3vl_token_ids

    raw = release_config(QWEN3VL_PRESETS["qwen3vl-moe-tiny"], qwen3vl_token_ids())
    assert raw["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert raw["model_type"] == raw["vision_config"]["model_type"] == "qwen3_vl_moe"
    text = raw["text_config"]
    assert text["model_type"] == "qwen3_vl_moe_text"
    assert {k: text[k] for k in MOE_TEXT_KEYS} == {
        "decoder_sparse_step": 1,  # every layer sparse, as 30B-A3B
        "mlp_only_layers": [],
        "moe_intermediate_size": 16,
        "norm_topk_prob": True,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    }
    config = Qwen3VLMoeConfig.from_dict(raw)
    assert config.text_config.num_experts == 8 and config.text_config.num_experts_per_tok == 2
    assert config.vision_config.model_type == "qwen3_vl_moe_vision"  # the releases' quirk


# --- which family -------------------------------------------------------------------------


def _config_only(folder: Path, raw: dict[str, Any]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    ("raw", "family"),
    [
        ({"architectures": ["InternVLChatModel"]}, Family.INTERNVL),
        ({"architectures": ["InternVLForConditionalGeneration"]}, Family.INTERNVL),
        ({"architectures": ["Qwen3VLForConditionalGeneration"]}, Family.QWEN3_VL),
        ({"architectures": ["Qwen3VLMoeForConditionalGeneration"]}, Family.QWEN3_VL_MOE),
        ({"model_type": "internvl_chat"}, Family.INTERNVL),
        ({"model_type": "qwen3_vl"}, Family.QWEN3_VL),
        ({"model_type": "qwen3_vl_moe"}, Family.QWEN3_VL_MOE),
    ],
)
def test_the_family_is_read_from_config_json(
    tmp_path: Path, raw: dict[str, Any], family: Family
) -> None:
    assert checkpoint_family(_config_only(tmp_path / "c", raw)) is family


def test_unknown_families_are_named(tmp_path: Path, tiny: Path) -> None:
    llava = _config_only(tmp_path / "a", {"architectures": ["LlavaForConditionalGeneration"]})
    with pytest.raises(ValueError, match="'LlavaForConditionalGeneration' is not one of"):
        checkpoint_family(llava)
    with pytest.raises(ValueError, match="neither 'architectures' nor 'model_type'"):
        checkpoint_family(_config_only(tmp_path / "b", {}))
    with pytest.raises(ValueError, match="no such file"):
        checkpoint_family(tmp_path / "nothing")
    assert checkpoint_family(tiny) is Family.QWEN3_VL
    # the InternVL reader says what the folder is rather than "unknown architecture"
    with pytest.raises(ValueError, match="is Qwen3-VL, not InternVL"):
        load_config(tiny)
    internvl = _config_only(tmp_path / "i", {"architectures": ["InternVLChatModel"]})
    with pytest.raises(ValueError, match="InternVL checkpoint, not Qwen3-VL"):
        load_qwen3vl_config(internvl)


def test_dense_qwen3vl_is_servable(tiny: Path) -> None:
    for command in ("vision", "language", "up"):
        assert require_servable(tiny, command) is Family.QWEN3_VL


def test_require_servable_passes_internvl(tmp_path: Path) -> None:
    internvl = _config_only(tmp_path / "i", {"architectures": ["InternVLForConditionalGeneration"]})
    assert require_servable(internvl, "vision") is Family.INTERNVL


# --- tensors checked before serving -------------------------------------------------------


def _rewrite_tensors(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_the_preset_verifies(tiny: Path) -> None:
    verify_qwen3vl(load_qwen3vl_config(tiny))


def test_a_missing_deepstack_merger_tensor_is_named(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path / "ckpt")
    gone = "model.visual.deepstack_merger_list.1.linear_fc2.weight"
    _rewrite_tensors(folder, lambda t: t.pop(gone))
    with pytest.raises(CheckpointMismatch) as raised:
        verify_qwen3vl(load_qwen3vl_config(folder))
    assert f"missing: {gone} (64, 256)" in str(raised.value)
    assert "DeepStack levels at ViT layers 0, 1, 2" in str(raised.value)


def test_mis_shaped_extra_and_llm_tensors_are_named(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path / "ckpt")

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.visual.deepstack_merger_list.3.norm.weight"] = torch.ones(256)
        merger = "model.visual.merger.linear_fc1.weight"
        tensors[merger] = tensors[merger][:, :-1].clone()
        tensors.pop("model.language_model.layers.2.self_attn.k_norm.weight")

    _rewrite_tensors(folder, damage)
    config = load_qwen3vl_config(folder)
    with pytest.raises(CheckpointMismatch) as raised:
        verify_qwen3vl(config)
    text = str(raised.value)
    assert "not part of this model: model.visual.deepstack_merger_list.3.norm.weight" in text
    assert (
        "wrong shape: model.visual.merger.linear_fc1.weight in model.safetensors is (256, 255)"
        in text
    )
    from dvd.checkpoint.qwen3vl_verify import verify_qwen3vl_llm
    from dvd.checkpoint.weights import CheckpointWeights

    with pytest.raises(CheckpointMismatch, match=r"missing: model\.layers\.2\.self_attn\.k_norm"):
        verify_qwen3vl_llm(config, CheckpointWeights(config))


def test_the_pre_4_52_visual_prefix_is_read(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path / "ckpt")

    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.startswith("model.visual.")]:
            tensors[name[len("model.") :]] = tensors.pop(name)

    _rewrite_tensors(folder, rename)
    verify_qwen3vl(load_qwen3vl_config(folder))


def _tiny_moe(folder: Path, *, release_layout: bool) -> Path:
    """A Qwen3-VL-MoE checkpoint: config.json as transformers 5 writes it, zero tensors of
    transformers' shapes; with release_layout the fused experts are transposed as the
    releases store them (transformers' conversion_mapping transposes them on load)."""
    from safetensors.torch import save_file
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    config = Qwen3VLMoeConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 64,
            "deepstack_visual_indexes": [0, 1],
            "num_position_embeddings": 64,
        },
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "vocab_size": 640,
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        },
        image_token_id=600,
        video_token_id=601,
        vision_start_token_id=602,
        vision_end_token_id=603,
    )
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(config)
    tensors = {}
    for name, tensor in model.state_dict().items():
        shape = list(tensor.shape)
        if release_layout and ".mlp.experts." in name:
            shape[1], shape[2] = shape[2], shape[1]
        tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
    folder.mkdir()
    config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_moe_is_detected_verified_in_the_release_layout_and_servable(tmp_path: Path) -> None:
    folder = _tiny_moe(tmp_path / "moe", release_layout=True)
    assert checkpoint_family(folder) is Family.QWEN3_VL_MOE
    config = load_qwen3vl_config(folder)
    assert config.is_moe and config.llm_config["model_type"] == "qwen3_moe"
    assert config.llm_config["num_experts"] == 4
    verify_qwen3vl(config)
    assert require_servable(folder, "language") is Family.QWEN3_VL_MOE
    # experts left in transformers 5's in-memory orientation are not what vLLM loads
    other = _tiny_moe(tmp_path / "moe-t5", release_layout=False)
    with pytest.raises(CheckpointMismatch, match=r"experts\.down_proj .* is \(4, 64, 16\)"):
        verify_qwen3vl(load_qwen3vl_config(other))


# --- CLI ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvd")
    checkpoint_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_a_qwen3vl_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    args = _parser().parse_args(["make-checkpoint", "--preset", "qwen3vl-tiny", str(out)])
    assert args.func(args) == 0
    assert "qwen3vl-tiny hf-layout checkpoint (random weights)" in capsys.readouterr().out
    assert checkpoint_family(out) is Family.QWEN3_VL
    wrong = _parser().parse_args(
        ["make-checkpoint", "--preset", "qwen3vl-tiny", "--layout", "original", str(tmp_path / "x")]
    )
    assert wrong.func(wrong) == 2
    assert "one layout" in capsys.readouterr().err


def test_same_seed_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = make_checkpoint(tmp_path / "again", "qwen3vl-tiny")
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
