"""InternVL3.5 and Qwen3-VL checkpoints: read the published layouts by key name, no remote
code; write small random-weight checkpoints with the real releases' layout.

Modules: `family` (which family a folder holds, and whether this version serves it: the one
question the servers and `dvd up` ask first), `config` (InternVL config.json ->
InternVLConfig), `names` (weight names of both InternVL layouts), `weights` (lazy safetensors
access), `llm_tensors` and `verify` (the tensors config.json calls for, checked before
serving), `presets` (sizes), `tokenizer`, `config_files`, `random_weights`, `hf_writer` and
`make` (writing), `cli` (`dvd make-checkpoint`). Qwen3-VL has its own `qwen3vl_config`,
`qwen3vl_verify`, `qwen3vl_presets`, `qwen3vl_tokenizer` and `qwen3vl_writer` (its facts
are in those modules' docstrings and docs/qwen3vl.md).

LLM settings that can live at two levels of config.json, and which level wins (read in
transformers 5.19's configuration_internvl.py / modeling_utils.py and in OpenGVLab's
InternVLChatConfig, the original releases' remote code):
- tie_word_embeddings. -HF: the top level. InternVLConfig has its own field (default true)
  and the model ties its head by it; text_config's flag is not read, and transformers 5
  writes both, so a model built from a Qwen3 config (text flag false) is tied and saved
  with no lm_head tensor. An absent top-level key means true. Original: llm_config.
  InternVLChatConfig sets `self.tie_word_embeddings = self.llm_config.tie_word_embeddings`,
  overwriting the top-level key, and the LLM ties by its own config; an absent key takes the
  LLM class's default (false for Qwen2, Qwen3, Qwen3-MoE and Llama). `config.py` resolves
  it once and the LLM view gives vLLM the resolved value.
- vocab_size, bos/eos/pad_token_id, rope settings (rope_theta/rope_scaling, or transformers
  5's rope_parameters), max_position_embeddings, head_dim, sliding windows: the text level
  only. Neither InternVLConfig nor the LLM reads a top-level copy; InternVLChatConfig copies
  some of them up (vocab_size, hidden_size, token ids) for generation utilities, never down.
  Missing ones take the text class's defaults, as vLLM reading the view through
  transformers does (`llm_tensors.resolve_text_config`). Which token ends a turn is
  generation_config.json's business: the LLM view links it, so vLLM stops as transformers'
  generate does.
- dtype / torch_dtype: transformers 5 writes `dtype` at the top level only; 4.x wrote
  `torch_dtype` at both. The text level is read first, then the top level, then bfloat16.
  It only informs: the servers' --dtype decides what they compute in.
- image_token_id (-HF), the tiling keys and downsample_ratio: top level only (no text twin).

Sources the names, shapes, config keys and tokenizer facts were checked against:
- transformers 5.19 (installed): models/internvl/configuration_internvl.py,
  modeling_internvl.py (InternVLVisionModel, InternVLMultiModalProjector, pixel_shuffle,
  `_tied_weights_keys`), processing_internvl.py (tokenizer attributes start_image_token,
  end_image_token, context_image_token, video_token), conversion_mapping.py ("internvl" ->
  "llava" renames for checkpoints without the "model." prefix), models/qwen2/
  tokenization_qwen2.py (byte-level BPE pipeline and split regex).
- transformers' convert_internvl_weights_to_hf.py (huggingface/transformers on GitHub): the
  original -> -HF renames (vision_model -> vision_tower, layers -> layer, class_embedding ->
  cls_token, ls1 -> lambda_1, norm1 -> layernorm_before, attn.proj ->
  attention.projection_layer, mlp1.{0,1,3} -> multi_modal_projector.{layer_norm,linear_1,
  linear_2}), the qkv split order (q, k, v), and the chat template.
- vLLM 0.32 (installed): model_executor/models/intern_vit.py (class_embedding,
  patch_embedding, position_embedding, attn.qkv/proj/q_norm/k_norm, ls1/ls2, norm1/norm2,
  mlp.fc1/fc2), internvl.py (mlp1 = LayerNorm, Linear, GELU, Linear; pixel shuffle v1/v2;
  select_layer; force_image_size), interns1.py (the -HF prefixes model.vision_tower.,
  model.multi_modal_projector., model.language_model., lm_head.), registry.py.
- OpenGVLab/InternVL on GitHub, internvl_chat_gpt_oss/ (the InternVL3.5 code):
  configuration_internvl_chat.py and configuration_intern_vit.py (keys and defaults),
  train/constants.py and the fine-tuning scripts (the 9 InternVL tokens and their order).
- Hugging Face file listings of OpenGVLab/InternVL3_5-1B, -4B, -8B and InternVL3-8B-hf
  (which files a release has, and their sizes): added_tokens.json is 892 bytes, which is
  exactly Qwen3's 26 added tokens + the 9 InternVL ones at 151643..151677;
  chat_template.jinja is 475 bytes, exactly the converter's template with "<image>\\n"
  (the -hf one, 481 bytes, with "<IMG_CONTEXT>\\n"); generation_config.json is 69 bytes
  (no token ids) for the original releases and 126 bytes (bos 151643, eos 151645) for -hf.
"""

from dvd.checkpoint.config import FlashConfig, InternVLConfig, VisionConfig, load_config
from dvd.checkpoint.family import Family, checkpoint_family
from dvd.checkpoint.make import make_checkpoint
from dvd.checkpoint.presets import PRESETS, Preset
from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, load_qwen3vl_config
from dvd.checkpoint.qwen3vl_presets import QWEN3VL_PRESETS
from dvd.checkpoint.weights import CheckpointWeights

__all__ = [
    "PRESETS",
    "QWEN3VL_PRESETS",
    "CheckpointWeights",
    "Family",
    "FlashConfig",
    "InternVLConfig",
    "Preset",
    "Qwen3VLConfig",
    "VisionConfig",
    "checkpoint_family",
    "load_config",
    "load_qwen3vl_config",
    "make_checkpoint",
]
