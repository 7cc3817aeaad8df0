"""dvd.checkpoint: both InternVL3.5 layouts round-trip, load in transformers, and fail loudly."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from dvd.checkpoint import (
    PRESETS,
    CheckpointWeights,
    load_config,
    make_checkpoint,
)
from dvd.checkpoint import cli as checkpoint_cli
from dvd.checkpoint.config import HF_VISION_DEFAULTS
from dvd.checkpoint.llm_tensors import resolve_text_config
from dvd.checkpoint.names import is_hf_vision_name, is_original_vision_name, llm_weight_name
from dvd.checkpoint.tokenizer import (
    HF_CHAT_TEMPLATE,
    INTERNVL_TOKENS,
    ORIGINAL_CHAT_TEMPLATE,
    QWEN3_ADDED_TOKENS,
    REAL_FIRST_ADDED_ID,
    REGULAR_VOCAB,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "original": make_checkpoint(root / "tiny-original", "tiny", "original", seed=3),
        "hf": make_checkpoint(root / "tiny-hf", "tiny", "hf", seed=3),
    }


SETTINGS_THAT_MATTER = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_parameters",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
)


def _tokenizer(path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    # The original layout's config.json has an auto_map (as the real release does);
    # trust_remote_code=False keeps transformers from asking whether to run that code.
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


# --- both layouts hold the same model --------------------------------------------------


def test_layouts_have_the_real_files(checkpoints: dict[str, Path]) -> None:
    common = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    }
    original = {p.name for p in checkpoints["original"].iterdir()}
    hf = {p.name for p in checkpoints["hf"].iterdir()}
    assert original == common | {"model.safetensors.index.json"}
    assert hf == common | {"preprocessor_config.json", "processor_config.json"}
    from safetensors import safe_open

    for path in checkpoints.values():
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_load_config_agrees_across_layouts(checkpoints: dict[str, Path]) -> None:
    original = load_config(checkpoints["original"])
    hf = load_config(checkpoints["hf"])
    assert (original.layout, hf.layout) == ("original", "hf")
    assert original.vision == hf.vision
    assert original.tokens_per_tile == hf.tokens_per_tile == 256
    # transformers writes the text config in its own spelling (rope_parameters, dtype at the
    # top level); read through transformers' config class both say the same.
    ours, theirs = resolve_text_config(original.llm_config), resolve_text_config(hf.llm_config)
    for key in SETTINGS_THAT_MATTER:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert original.tie_word_embeddings is hf.tie_word_embeddings is False
    assert original.llm_config["architectures"] == ["Qwen3ForCausalLM"]
    assert original.llm_config["torch_dtype"] == "bfloat16"
    assert original.llm_hidden_size == 64
    for config in (original, hf):
        assert (config.downsample_ratio, config.ps_version, config.select_layer) == (0.5, "v2", -1)
        assert (config.min_dynamic_patch, config.max_dynamic_patch) == (1, 12)
        assert config.use_thumbnail and config.image_size == 448
        assert config.img_context_token == "<IMG_CONTEXT>"
    assert original.template == "internvl2_5"
    assert original.name == "tiny-original"


def test_vision_state_dict_is_the_same_in_both_layouts(checkpoints: dict[str, Path]) -> None:
    original = CheckpointWeights(load_config(checkpoints["original"])).vision_state_dict()
    hf = CheckpointWeights(load_config(checkpoints["hf"])).vision_state_dict()
    assert list(original) == list(hf)
    for name, tensor in original.items():
        assert torch.equal(tensor, hf[name]), name
    d = PRESETS["tiny"].vit_hidden
    assert original["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (3 * d, d)
    assert original["vision_model.embeddings.position_embedding"].shape == (1, 1025, d)
    assert original["mlp1.0.weight"].shape == (4 * d,)
    assert original["mlp1.1.weight"].shape == (64, 4 * d)
    assert original["mlp1.3.weight"].shape == (64, 64)
    assert {"ls1", "ls2"} <= {n.rsplit(".", 1)[-1] for n in original}
    as_float = CheckpointWeights(load_config(checkpoints["hf"])).vision_state_dict(torch.float32)
    assert {t.dtype for t in as_float.values()} == {torch.float32}


def test_llm_names_are_those_of_a_plain_qwen3(checkpoints: dict[str, Path]) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = load_config(checkpoints["original"])
    expected = set(Qwen3ForCausalLM(Qwen3Config(**config.llm_config)).state_dict())
    mapped = {}
    for layout, path in checkpoints.items():
        weights = CheckpointWeights(load_config(path))
        vision = weights.vision_state_dict()
        plain = {}
        for stored in weights.names():
            name = weights.llm_weight_name(stored)
            if name is None:
                # whatever is not the LLM must be a vision/projector weight
                assert is_original_vision_name(stored) or is_hf_vision_name(stored), stored
                assert layout == "hf" or stored in vision
            else:
                plain[name] = weights.get(stored)
        assert set(plain) == expected, layout
        mapped[layout] = plain
    for name in expected:
        assert torch.equal(mapped["original"][name], mapped["hf"][name]), name
    weights = CheckpointWeights(config)
    embed = weights.embed_tokens()
    assert embed.shape == (config.llm_config["vocab_size"], 64)
    assert torch.equal(embed, mapped["original"]["model.embed_tokens.weight"])


def test_llm_weight_name_covers_every_spelling() -> None:
    cases = {
        "language_model.model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "model.language_model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.language_model.norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "vision_model.encoder.layers.0.ls1": None,
        "mlp1.1.weight": None,
        "mlp2.0.weight": None,
        "model.vision_tower.embeddings.cls_token": None,
        "model.multi_modal_projector.linear_1.weight": None,
    }
    for stored, plain in cases.items():
        assert llm_weight_name(stored) == plain, stored


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", "tiny", "original", seed=7)
    b = make_checkpoint(tmp_path / "b", "tiny", "original", seed=7)
    c = make_checkpoint(tmp_path / "c", "tiny", "original", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


# --- transformers reads the -HF layout as a real release --------------------------------


def test_transformers_loads_hf_layout_strictly(checkpoints: dict[str, Path]) -> None:
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        checkpoints["hf"], output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    state = model.state_dict()
    weights = CheckpointWeights(load_config(checkpoints["hf"]))
    for name in weights.names():
        assert torch.equal(state[_module_name(name)], weights.get(name)), name
    # untied LLM: the converter's default tie_word_embeddings=True must not apply
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    vision = weights.vision_state_dict()
    layer = model.model.vision_tower.encoder.layer[1]
    qkv = torch.cat([layer.attention.q_proj.weight, layer.attention.k_proj.weight])
    qkv = torch.cat([qkv, layer.attention.v_proj.weight])
    assert torch.equal(vision["vision_model.encoder.layers.1.attn.qkv.weight"], qkv)
    assert torch.equal(vision["vision_model.encoder.layers.1.ls2"], layer.lambda_2)
    assert torch.equal(
        vision["mlp1.3.bias"], model.model.multi_modal_projector.linear_2.bias.detach()
    )


def _module_name(stored: str) -> str:
    """transformers 5 writes the pre-4.52 names (language_model.model.*, vision_tower.*) and
    renames them to its modules' on load."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if stored.startswith(old):
            return new + stored[len(old) :]
    return stored


def test_hf_image_processor_tiles_like_internvl(checkpoints: dict[str, Path]) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(checkpoints["hf"])
    pixels = processor(images=[Image.new("RGB", (1024, 768))], return_tensors="pt")
    # 1024x768 -> a 4x3 grid of 448 px tiles + a thumbnail
    assert pixels["pixel_values"].shape == (13, 3, 448, 448)


def test_hf_defaults_are_transformers_defaults(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import InternVLVisionConfig

    reference = InternVLVisionConfig()
    for key, value in HF_VISION_DEFAULTS.items():
        actual = getattr(reference, key)
        assert (list(actual) if isinstance(actual, tuple) else actual) == value, key
    # transformers saves -HF configs as a diff against these defaults: a config with the
    # default-valued keys left out must read the same.
    folder = tmp_path / "diffed"
    shutil.copytree(checkpoints["hf"], folder)
    raw = json.loads((folder / "config.json").read_text())
    for key in ("layer_norm_eps", "norm_type", "num_channels", "use_qk_norm", "hidden_act"):
        del raw["vision_config"][key]
    assert "architectures" not in raw["text_config"]  # transformers writes none there
    (folder / "config.json").write_text(json.dumps(raw))
    diffed = load_config(folder)
    assert diffed.vision == load_config(checkpoints["hf"]).vision
    assert diffed.llm_config["architectures"] == ["Qwen3ForCausalLM"]


# --- the tokenizer ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_tokenizer_special_tokens_and_ids(checkpoints: dict[str, Path], layout: str) -> None:
    tokenizer = _tokenizer(checkpoints[layout])
    added = [c for c, _ in QWEN3_ADDED_TOKENS] + list(INTERNVL_TOKENS)
    if layout == "hf":
        added.append("<video>")
    assert len(tokenizer) == REGULAR_VOCAB + len(added)
    for i, content in enumerate(added):
        assert tokenizer.convert_tokens_to_ids(content) == REGULAR_VOCAB + i, content
        assert tokenizer.encode(content, add_special_tokens=False) == [REGULAR_VOCAB + i]
    # same offsets as the real release: <IMG_CONTEXT> is 151671 there
    assert tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") - REGULAR_VOCAB == 151671 - (
        REAL_FIRST_ADDED_ID
    )
    ids = tokenizer.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img>", add_special_tokens=False)
    assert ids == [REGULAR_VOCAB + 26, REGULAR_VOCAB + 28, REGULAR_VOCAB + 28, REGULAR_VOCAB + 27]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None

    config = load_config(checkpoints[layout])
    assert config.llm_config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.llm_config["bos_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vocab = config.llm_config["vocab_size"]
    assert vocab >= len(tokenizer) and vocab % 64 == 0
    raw = json.loads((checkpoints[layout] / "config.json").read_text())
    generation = json.loads((checkpoints[layout] / "generation_config.json").read_text())
    if layout == "hf":
        assert raw["image_token_id"] == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        assert generation["eos_token_id"] == tokenizer.eos_token_id
        assert generation["bos_token_id"] == config.llm_config["bos_token_id"]
        assert tokenizer.context_image_token == "<IMG_CONTEXT>"
        assert tokenizer.start_image_token == "<img>" and tokenizer.end_image_token == "</img>"
    else:
        assert set(generation) == {"_from_model_config", "transformers_version"}


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_chat_template_renders_the_real_format(checkpoints: dict[str, Path], layout: str) -> None:
    tokenizer = _tokenizer(checkpoints[layout])
    messages = [{"role": "user", "content": "What is in this image?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is in this image?<|im_end|>\n<|im_start|>assistant\n"
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = tokenizer.apply_chat_template(image, tokenize=False, add_generation_prompt=False)
    placeholder = "<IMG_CONTEXT>" if layout == "hf" else "<image>"
    assert text == f"<|im_start|>user\n{placeholder}\nHi<|im_end|>\n"
    jinja = (checkpoints[layout] / "chat_template.jinja").read_bytes()
    # the real files' sizes: InternVL3_5-*/chat_template.jinja and InternVL3-*-hf's
    assert len(jinja) == (481 if layout == "hf" else 475)
    assert jinja.decode() == (HF_CHAT_TEMPLATE if layout == "hf" else ORIGINAL_CHAT_TEMPLATE)


def test_tokenizer_round_trips_text(checkpoints: dict[str, Path]) -> None:
    tokenizer = _tokenizer(checkpoints["original"])
    for text in (
        "The quick brown fox jumps over the lazy dog.",
        "  Tabs\tand\nnew lines, 448 px; émigré ☃ 日本語!",
        "<|im_start|>user\nHello<|im_end|>\n",
    ):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # the merges are real: common words are single tokens
    assert len(tokenizer.encode(" the image", add_special_tokens=False)) == 2


def test_tiny_llm_greedy_output_is_not_degenerate(checkpoints: dict[str, Path]) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = load_config(checkpoints["original"])
    weights = CheckpointWeights(config)
    model = Qwen3ForCausalLM(Qwen3Config(**config.llm_config))
    state = {}
    for stored in weights.names():
        name = weights.llm_weight_name(stored)
        if name is not None:
            state[name] = weights.get(stored).float()
    model.load_state_dict(state, strict=True)
    tokenizer = _tokenizer(checkpoints["original"])
    messages = [{"role": "user", "content": "Describe the image."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
    )
    new = out[0, ids.shape[1] :].tolist()
    assert len(set(new)) > 4, new
    # padding rows and added tokens (but EOS) are muted in lm_head: never generated
    assert all(i < REGULAR_VOCAB or i == tokenizer.eos_token_id for i in new), new


# --- presets -------------------------------------------------------------------------


def test_small_preset_keeps_internvl35_2b_proportion() -> None:
    small = PRESETS["small"]
    ratio = small.vit_flops_per_tile() / small.llm_flops_per_tile()
    assert 0.8 < ratio < 1.25, ratio
    assert small.tokens_per_tile == 256 and small.vit_tokens == 1025
    for preset in PRESETS.values():
        assert preset.llm_head_dim in (32, 64, 80, 96, 112, 128)


# --- errors --------------------------------------------------------------------------


def test_folder_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json: no such file"):
        load_config(tmp_path)


def test_unknown_architecture(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    raw = json.loads((checkpoints["original"] / "config.json").read_text())
    raw["architectures"] = ["LlavaForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("layout", "remove", "message"),
    [
        ("original", ("llm_config",), "'llm_config'"),
        ("original", ("vision_config", "hidden_size"), "'vision_config.hidden_size'"),
        ("original", ("llm_config", "vocab_size"), "'llm_config.vocab_size'"),
        ("hf", ("text_config",), "'text_config'"),
        ("hf", ("text_config", "hidden_size"), "'text_config.hidden_size'"),
    ],
)
def test_missing_required_key(
    checkpoints: dict[str, Path], tmp_path: Path, layout: str, remove: tuple[str, ...], message: str
) -> None:
    raw = json.loads((checkpoints[layout] / "config.json").read_text())
    parent = raw
    for key in remove[:-1]:
        parent = parent[key]
    del parent[remove[-1]]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path)


def test_bad_values_name_the_field(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    raw = json.loads((checkpoints["original"] / "config.json").read_text())
    raw["vision_config"]["norm_type"] = "batch_norm"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="norm_type"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path)


def test_index_naming_a_missing_file(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints["original"], folder)
    weights = CheckpointWeights(load_config(folder))
    assert weights.files == [folder / "model.safetensors"]
    (folder / "model.safetensors").rename(folder / "elsewhere.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        CheckpointWeights(load_config(folder))
    with pytest.raises(KeyError):
        CheckpointWeights(load_config(checkpoints["original"])).get("no.such.weight")


# --- CLI -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvd")
    checkpoint_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_make_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt"
    args = _parser().parse_args(["make-checkpoint", "--layout", "hf", "--seed", "2", str(out)])
    assert args.func is checkpoint_cli.run
    assert args.func(args) == 0
    assert load_config(out).layout == "hf"
    assert "random" in capsys.readouterr().out
    # an existing checkpoint is kept unless --force
    assert args.func(args) == 2
    assert "--force" in capsys.readouterr().err
    forced = _parser().parse_args(["make-checkpoint", "--force", str(out)])
    assert forced.func(forced) == 0
    assert load_config(out).layout == "original"
    # --force never deletes a folder that is not a checkpoint
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    forced = _parser().parse_args(["make-checkpoint", "--force", str(other)])
    assert forced.func(forced) == 2
    assert (other / "keep.txt").read_text() == "mine"


def test_cli_help_says_weights_are_random(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["make-checkpoint", "--help"])
    help_text = capsys.readouterr().out
    assert (
        "RANDOM" in help_text
        and "--preset" in help_text
        and "DVD_MAKE_CHECKPOINT_SEED" in help_text
    )


def test_cli_rejects_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["make-checkpoint", "--preset", "huge", "out"])
    assert "huge" in capsys.readouterr().err
