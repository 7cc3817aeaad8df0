"""Loading is exact and loud: the head's tying is read as transformers reads it, and a
checkpoint whose tensors do not fit its config.json stops the servers before they serve.

The -HF checkpoints here are written by transformers' own save_pretrained (dvd.checkpoint's
hf_writer), so what is stored (a tied head is no tensor at all) and how config.json nests
its keys are transformers', not ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dvd.checkpoint import CheckpointWeights, load_config, make_checkpoint
from dvd.checkpoint.llm_tensors import expected_llm_tensors
from dvd.checkpoint.verify import CheckpointMismatch, verify_llm
from vision_server.encoder import verify_vision


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    made = {}
    for preset in ("tiny", "tiny-tied", "tiny-qwen2"):
        for layout in ("original", "hf"):
            made[f"{preset}/{layout}"] = make_checkpoint(
                root / f"{preset}-{layout}", preset, layout
            )
    made["tiny-flash/original"] = make_checkpoint(root / "flash", "tiny-flash", "original")
    return made


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_config(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    (folder / "config.json").write_text(json.dumps(raw))


def _rewrite_tensors(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Rewrites model.safetensors (and the index, if any) after `edit(tensors)`."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        raw = json.loads(index.read_text())
        raw["weight_map"] = {name: file.name for name in sorted(tensors)}
        index.write_text(json.dumps(raw))


# --- the head's tying, as transformers reads it ----------------------------------------


def test_transformers_tied_head_is_written_as_no_tensor_and_read_as_tied(
    checkpoints: dict[str, Path],
) -> None:
    """The issue's checkpoint: text_config says untied, the top level (default) says tied."""
    from transformers import InternVLForConditionalGeneration

    folder = checkpoints["tiny-tied/hf"]
    raw = json.loads((folder / "config.json").read_text())
    assert raw["tie_word_embeddings"] is True and raw["text_config"]["tie_word_embeddings"] is False
    weights = CheckpointWeights(load_config(folder))
    assert not [name for name in weights.names() if "lm_head" in name]
    model = InternVLForConditionalGeneration.from_pretrained(folder)
    embed = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    config = load_config(folder)
    assert config.tie_word_embeddings is True
    assert config.llm_config["tie_word_embeddings"] is True  # what vLLM's view is given
    verify_llm(config)


@pytest.mark.parametrize(
    ("layout", "top", "text", "tied"),
    [
        ("hf", None, False, True),  # InternVLConfig's default wins over the text config
        ("hf", True, False, True),
        ("hf", False, True, False),
        ("original", False, True, True),  # InternVLChatConfig copies llm_config's flag up
        ("original", True, False, False),
        ("original", True, None, False),  # the LLM class's default (Qwen3: untied)
    ],
)
def test_tie_word_embeddings_is_resolved_per_layout(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    layout: str,
    top: bool | None,
    text: bool | None,
    tied: bool,
) -> None:
    folder = _copy(checkpoints[f"tiny/{layout}"], tmp_path / "ckpt")
    key = "text_config" if layout == "hf" else "llm_config"

    def edit(raw: dict) -> None:
        for parent, value in ((raw, top), (raw[key], text)):
            parent.pop("tie_word_embeddings", None)
            if value is not None:
                parent["tie_word_embeddings"] = value

    _edit_config(folder, edit)
    assert load_config(folder).tie_word_embeddings is tied


def test_the_hf_reading_agrees_with_transformers(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoConfig

    for name, folder in checkpoints.items():
        if not name.endswith("/hf"):
            continue
        theirs = AutoConfig.from_pretrained(folder)
        ours = load_config(folder)
        assert ours.tie_word_embeddings is theirs.tie_word_embeddings, name
        assert ours.llm_config["vocab_size"] == theirs.text_config.vocab_size
        assert ours.llm_config["model_type"] == theirs.text_config.model_type


# --- what each LLM family needs ----------------------------------------------------------

FAMILIES = {
    "qwen3": {"head_dim": 32, "attention_bias": False},
    "qwen2": {},
    "llama": {"head_dim": 32, "attention_bias": True, "mlp_bias": True},
}
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 320,
}


def _transformers_shapes(model_type: str, settings: dict) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_expected_llm_tensors_are_transformers_own(model_type: str, tied: bool) -> None:
    settings = {**SIZES, **FAMILIES[model_type], "tie_word_embeddings": tied}
    theirs = _transformers_shapes(model_type, settings)
    if tied:
        del theirs["lm_head.weight"]  # the embedding table under a second name
    ours, complete = expected_llm_tensors({"model_type": model_type, **settings}, tied)
    assert complete and ours == theirs


def test_expected_moe_tensors_are_transformers_own_stored_per_expert() -> None:
    """transformers 5 fuses experts in memory (and splits them on save); checkpoints and
    vLLM keep one gate/up/down per expert."""
    settings = {
        **SIZES,
        "head_dim": 32,
        "moe_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    }
    theirs = {}
    for name, shape in _transformers_shapes("qwen3_moe", settings).items():
        prefix, _, param = name.rpartition("experts.")
        if not prefix:
            theirs[name] = shape
            continue
        experts, rows, cols = shape
        for expert in range(experts):
            base = f"{prefix}experts.{expert}."
            if param == "gate_up_proj":
                theirs[base + "gate_proj.weight"] = (rows // 2, cols)
                theirs[base + "up_proj.weight"] = (rows // 2, cols)
            else:
                theirs[base + "down_proj.weight"] = (rows, cols)
    ours, complete = expected_llm_tensors({"model_type": "qwen3_moe", **settings}, False)
    assert complete and ours == theirs
    assert "model.layers.1.mlp.gate_proj.weight" in ours  # mlp_only_layers stay dense


def test_unknown_family_checks_what_every_family_has() -> None:
    llm = {"model_type": "mistral", **SIZES}
    expected, complete = expected_llm_tensors(llm, tied=False)
    assert not complete
    assert set(expected) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


# --- a checkpoint that does not fit its config.json --------------------------------------


def test_every_preset_and_layout_verifies(checkpoints: dict[str, Path]) -> None:
    for folder in checkpoints.values():
        config = load_config(folder)
        weights = CheckpointWeights(config)
        verify_llm(config, weights)
        verify_vision(config, weights)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_a_missing_llm_tensor_is_named_with_its_file(
    checkpoints: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    folder = _copy(checkpoints[f"tiny/{layout}"], tmp_path / "ckpt")
    _rewrite_tensors(folder, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatch) as error:
        verify_llm(load_config(folder))
    message = str(error.value)
    assert "missing: model.layers.1.mlp.up_proj.weight (128, 64)" in message
    assert "model.safetensors" in message and str(folder) in message


def test_an_untied_config_without_a_head_tensor_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """What served empty answers before: config untied, no lm_head stored."""
    folder = _copy(checkpoints["tiny-tied/hf"], tmp_path / "ckpt")
    _edit_config(folder, lambda raw: raw.update(tie_word_embeddings=False))
    with pytest.raises(CheckpointMismatch, match=r"missing: lm_head\.weight \(576, 64\)") as error:
        verify_llm(load_config(folder))
    assert "tie_word_embeddings is false" in str(error.value)


@pytest.mark.parametrize(
    ("layout", "stored", "named"),
    [
        ("original", "vision_model.encoder.layers.0.mlp.fc1.weight", "mlp.fc1.weight"),
        ("hf", "vision_tower.encoder.layer.0.attention.k_proj.weight", "attention.k_proj"),
        ("hf", "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1"),
    ],
)
def test_a_mis_shaped_vision_tensor_is_named(
    checkpoints: dict[str, Path], tmp_path: Path, layout: str, stored: str, named: str
) -> None:
    folder = _copy(checkpoints[f"tiny/{layout}"], tmp_path / "ckpt")

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors[stored] = tensors[stored][:-1].clone()

    _rewrite_tensors(folder, shrink)
    config = load_config(folder)
    with pytest.raises(CheckpointMismatch, match="wrong shape") as error:
        verify_vision(config, CheckpointWeights(config))
    assert named in str(error.value) and "model.safetensors" in str(error.value)
    verify_llm(config)  # the LLM half is fine


def test_missing_router_and_leftover_tensors_are_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    flash = _copy(checkpoints["tiny-flash/original"], tmp_path / "flash")
    _rewrite_tensors(flash, lambda t: t.pop("gating.gate.1.weight"))
    config = load_config(flash)
    with pytest.raises(CheckpointMismatch, match=r"missing: gating\.gate\.1\.weight"):
        verify_vision(config, CheckpointWeights(config))
    # a ViR tensor in a checkpoint whose config has no router is no part of the model
    plain = _copy(checkpoints["tiny/original"], tmp_path / "plain")
    _rewrite_tensors(plain, lambda t: t.update({"mlp2.0.weight": torch.ones(1024)}))
    config = load_config(plain)
    with pytest.raises(CheckpointMismatch, match=r"not part of this model: mlp2\.0\.weight"):
        verify_vision(config, CheckpointWeights(config))


# --- the servers refuse to start, before vLLM or the ViT is loaded -----------------------


def _start(command: str, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "dvd", command, "--model", str(folder), "--port", "0", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_language_server_refuses_a_checkpoint_missing_an_llm_tensor(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy(checkpoints["tiny/original"], tmp_path / "ckpt")
    _rewrite_tensors(folder, lambda t: t.pop("language_model.lm_head.weight"))
    result = _start("language", folder, "--vision", "127.0.0.1:1")
    assert result.returncode != 0
    assert "missing: lm_head.weight" in result.stderr
    assert "starting vLLM" not in result.stderr  # refused before the engine started


def test_vision_server_refuses_a_mis_shaped_vision_tensor(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy(checkpoints["tiny/hf"], tmp_path / "ckpt")
    stored = "vision_tower.embeddings.position_embeddings"
    _rewrite_tensors(folder, lambda t: t.update({stored: t[stored][:, :-1].clone()}))
    result = _start("vision", folder, "--host", "127.0.0.1")
    assert result.returncode != 0
    assert f"wrong shape: {stored} in model.safetensors is (1, 1024, 64)" in result.stderr


# --- vLLM's load report -------------------------------------------------------------------

VLLM_LOAD = """
import json, sys
from pathlib import Path
from dvd.checkpoint import load_config
from language_server.engine import EngineSettings, LlmEngine
from language_server.llm_view import prepare_llm_view

if __name__ == "__main__":  # vLLM's engine core is a spawned process
    view = prepare_llm_view(load_config(sys.argv[1]), sys.argv[2])
    config = json.loads((view / "config.json").read_text())
    config["tie_word_embeddings"] = False  # what the old reading of the -HF config gave vLLM
    (view / "config.json").write_text(json.dumps(config))
    LlmEngine.start(EngineSettings(view, "bfloat16", 256, 2, 2**24))
"""


def test_vllm_refuses_to_serve_a_parameter_the_checkpoint_did_not_fill(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Behind the start-up check: the engine's own load report, read strictly."""
    script = tmp_path / "load.py"
    script.write_text(VLLM_LOAD)
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    argv = [sys.executable, str(script), str(checkpoints["tiny-tied/hf"]), str(tmp_path / "c")]
    result = subprocess.run(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # vLLM's workers log to stdout
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert result.returncode != 0
    assert (
        "1 LLM parameters got no tensor from the checkpoint" in result.stdout
        and "would keep their initial values: ['lm_head.weight']" in result.stdout
    ), result.stdout[-3000:]
