"""Qwen3-VL on the vision server (issue 13): pixels in, DeepStack-wide feature rows out.

Modules, in the order an item goes through them:
- `processor_config`: the checkpoint's preprocessor_config.json /
  video_preprocessor_config.json (pixel budgets overridable), checked against config.json.
- `preprocess`: an image (PIL) or a clip of sampled frames with their timestamps ->
  `VisionInput` (flattened patches, grid (t, h, w), per-patch timestamps for video), as
  transformers' Qwen2-VL / Qwen3-VL processors compute them.
- `batching`: items from any requests cut into forwards by total patches.
- `model`: the ViT, merger and DeepStack mergers (`Qwen3VLVisionTower`), with the
  checkpoint's tensor names under `model.visual.`.
- `encoder`: loads the tower strictly from the checkpoint and turns items into rows
  [main | deepstack_1 | ... | deepstack_k], one per merged token, with each item's grid.
Not wired into the gRPC service yet (docs/qwen3vl.md says what remains).
"""
