"""Qwen3-VL on the vision server (issue 13): pixels in, DeepStack-wide feature rows out.

Modules: `processor_config` (the checkpoint's preprocessor_config.json /
video_preprocessor_config.json, pixel budgets overridable) and `preprocess` (an image or a
clip of sampled frames -> flattened patches + grid (t, h, w), as transformers' processors).
Not wired into the gRPC service yet (docs/qwen3vl.md says what remains).
"""
