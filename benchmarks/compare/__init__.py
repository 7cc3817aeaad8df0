"""`dvd bench compare`: each system started in turn, the same traffic against each, one report.

Modules: `config` (traffic, sizing, CPU pinning), `checkpoints` (the preset picks the family,
InternVL or Qwen3-VL; the checkpoints made and described), `lineup` (the systems and their
command lines), `vllm_native` (vLLM's own server on the -HF checkpoint, torchvision made
importable for it alone; `vllm_site/` is the sitecustomize it uses), `runner` (start, check,
measure, stop), `interference` (CPU other processes take meanwhile), `stages` (per-stage
times from /metrics), `results` (what was measured), `report` (JSON: figures, ratios, stage
attribution), `markdown`, `plots`, `cli`.
"""
