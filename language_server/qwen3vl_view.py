"""The Qwen3-VL view of a checkpoint for vLLM: its own model class, the tower never loaded.

Unlike InternVL's view (a plain CausalLM config, fed prompt embeddings), vLLM runs its own
Qwen3-VL model here, because that model computes the MRoPE positions from the prompt's
token ids and each image's grid. The view's config.json is the checkpoint's, whole
(vision_config included: vLLM builds the tower's shapes on the meta device), with
`architectures` naming our subclass that keeps DeepStack on without the tower
(language_server/qwen3vl_model.py, registered by language_server/vllm_plugin.py). The
processor files are linked too: vLLM builds the Qwen3-VL processor to expand each
`<|image_pad|>` to the image's token count, even when it gets embeddings.

The engine starts with QWEN3VL_ENGINE_ARGS: every modality's limit 0 (no tower, no vision
weights read) and `enable_mm_embeds` (the rows arrive as `image_embeds` / `video_embeds`
with their grids). The `dvd_llm_only` load format reads the checkpoint's
`model.language_model.*` and `lm_head.*` tensors in place and checks that every engine
parameter got one (language_server/vllm_plugin.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from dvd.checkpoint.config import read_json_object
from dvd.checkpoint.family import Family
from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig
from language_server.engine_args import EngineArgs
from language_server.llm_view import link_checkpoint_files, view_folder, write_source

MODEL_MODULE = "language_server.qwen3vl_model"
ARCHITECTURES = {
    Family.QWEN3_VL: "DvdQwen3VLForConditionalGeneration",
    Family.QWEN3_VL_MOE: "DvdQwen3VLMoeForConditionalGeneration",
}
"""Our vLLM model class per family: the view's `architectures`, registered by the plugin."""

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")

QWEN3VL_ENGINE_ARGS: EngineArgs = (
    ("limit_mm_per_prompt", {"image": 0, "video": 0}),
    ("enable_mm_embeds", True),
)
"""The vLLM engine arguments a Qwen3-VL view is served with."""


def prepare_qwen3vl_view(config: Qwen3VLConfig, cache_root: str | Path) -> Path:
    """Creates (or refreshes) the view folder and returns its path."""
    view = view_folder(config.path, cache_root)
    raw = read_json_object(config.path / "config.json")
    raw["architectures"] = [ARCHITECTURES[config.family]]
    (view / "config.json").write_text(json.dumps(raw, indent=2))
    link_checkpoint_files(config.path, view, PROCESSOR_FILES)
    write_source(view, config.path, family=config.family.value)
    return view
