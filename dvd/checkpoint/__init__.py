"""InternVL3.5 checkpoints: read either published layout by key name, no remote code; write
small random-weight checkpoints with the real releases' layout.

Modules: `config` (config.json -> InternVLConfig), `names` (weight names of both layouts),
`weights` (lazy safetensors access), `presets` (sizes), `tokenizer`, `config_files`,
`random_weights` and `make` (writing), `cli` (`dvd make-checkpoint`).

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
from dvd.checkpoint.make import make_checkpoint
from dvd.checkpoint.presets import PRESETS, Preset
from dvd.checkpoint.weights import CheckpointWeights

__all__ = [
    "PRESETS",
    "CheckpointWeights",
    "FlashConfig",
    "InternVLConfig",
    "Preset",
    "VisionConfig",
    "load_config",
    "make_checkpoint",
]
