"""vLLM plugin: the `dvd_llm_only` load format.

Registered through the `vllm.general_plugins` entry point, so vLLM's engine-core process
(not only ours) knows it. The loader reads the `language_model` tensors of an InternVL
checkpoint in place, under the names a plain CausalLM expects, and skips every vision and
projector tensor without reading it.

After loading it checks that every parameter of the engine's model was loaded from the
checkpoint. vLLM has such a check, but on unquantized models it counts every layer whose
quant method post-processes weights (every linear layer, the embedding and the head) as
loaded whatever happened, so an untied head with no tensor behind it served random logits
without a word. Here a parameter left at its initial values stops the engine with its name.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
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


def unloaded_parameters(parameter_names: Iterable[str], loaded: set[str]) -> list[str]:
    """The engine's parameters the checkpoint gave no value, sorted."""
    return sorted(name for name in parameter_names if name not in loaded)


def register() -> None:
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class LlmOnlyLoader(DefaultModelLoader):
        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            if self.enable_weights_track is None:
                self.enable_weights_track = True  # always: track_weights_loading is our check

        def download_model(self, model_config: Any) -> None:
            read_source(model_config.model)  # nothing to download; fail early if not a view

        def get_all_weights(
            self, model_config: Any, model: Any
        ) -> Generator[tuple[str, torch.Tensor], None, None]:
            self.counter_before_loading_weights = time.perf_counter()  # for vLLM's log line
            yield from iter_llm_weights(model_config.model)

        def track_weights_loading(
            self, model: Any, loaded_weights: set[str] | None, quantized: bool = False
        ) -> None:
            if quantized or loaded_weights is None:
                # Quantized layers own parameters no checkpoint carries (scales made while
                # loading): vLLM's own rules know which; without a report there is no check.
                super().track_weights_loading(model, loaded_weights, quantized)
                return
            names = (name for name, _ in model.named_parameters())
            missing = unloaded_parameters(names, loaded_weights)
            if missing:
                raise ValueError(
                    f"{len(missing)} LLM parameters got no tensor from the checkpoint "
                    f"{read_source(self._view)} and would keep their initial values: "
                    f"{missing[:20]}"
                )

        def load_weights(self, model: Any, model_config: Any) -> None:
            self._view = model_config.model
            super().load_weights(model, model_config)

    register_model_loader(LOAD_FORMAT)(LlmOnlyLoader)
