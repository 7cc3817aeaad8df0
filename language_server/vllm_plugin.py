"""vLLM plugin: the `dvd_llm_only` load format.

Registered through the `vllm.general_plugins` entry point, so vLLM's engine-core process
(not only ours) knows it. The loader reads the `language_model` tensors of an InternVL
checkpoint in place, under the names a plain CausalLM expects, and skips every vision and
projector tensor without reading it.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import torch

from language_server.llm_view import LOAD_FORMAT, read_source


def iter_llm_weights(view: str) -> Generator[tuple[str, torch.Tensor], None, None]:
    from safetensors import safe_open

    from dvd.checkpoint import CheckpointWeights, load_config

    weights = CheckpointWeights(load_config(read_source(view)))
    for file in weights.files:
        with safe_open(str(file), framework="pt") as handle:
            for stored in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = weights.llm_weight_name(stored)
                if name is not None:
                    yield name, handle.get_tensor(stored)


def register() -> None:
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class LlmOnlyLoader(DefaultModelLoader):
        def download_model(self, model_config: Any) -> None:
            read_source(model_config.model)  # nothing to download; fail early if not a view

        def get_all_weights(
            self, model_config: Any, model: Any
        ) -> Generator[tuple[str, torch.Tensor], None, None]:
            self.counter_before_loading_weights = time.perf_counter()  # for vLLM's log line
            yield from iter_llm_weights(model_config.model)

    register_model_loader(LOAD_FORMAT)(LlmOnlyLoader)
