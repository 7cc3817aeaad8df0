"""vLLM plugin: the `dvd_llm_only` load format, and our Qwen3-VL model classes.

Registered through the `vllm.general_plugins` entry point, so vLLM's engine-core process
(not only ours) knows it. The loader reads the LLM tensors of a checkpoint in place and
skips every vision and projector tensor without reading it: for InternVL under the names a
plain CausalLM expects (the view is a CausalLM), for Qwen3-VL under the checkpoint's own
`model.language_model.*` / `lm_head.*` names, which vLLM's Qwen3-VL model maps itself.
The Qwen3-VL classes that keep DeepStack without the tower (language_server/
qwen3vl_model.py) are registered by module and class name, so vLLM imports them (and its
own Qwen3-VL code) only when a Qwen3-VL view names them.

After loading it checks that every parameter of the engine's model was loaded from the
checkpoint. vLLM has such a check, but on unquantized models it counts every layer whose
quant method post-processes weights (every linear layer, the embedding and the head) as
loaded whatever happened, so an untied head with no tensor behind it served random logits
without a word. Here a parameter left at its initial values stops the engine with its name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable
from functools import partial
from typing import Any

import torch

from dvd.checkpoint.names import llm_weight_name
from language_server.llm_view import LOAD_FORMAT, read_source


def qwen3vl_weight_name(stored_name: str, tied: bool) -> str | None:
    """The name vLLM's Qwen3-VL model loads a stored LLM tensor by (the releases' own:
    `model.language_model.*`, `lm_head.*`; checkpoints older than transformers 4.52 store
    `language_model.model.*`); None for the vision tower, and for a head the tied model
    does not use."""
    name = llm_weight_name(stored_name)
    if name is None or (tied and name.startswith("lm_head.")):
        return None
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


def iter_llm_weights(view: str) -> Generator[tuple[str, torch.Tensor], None, None]:
    from safetensors import safe_open

    from dvd.checkpoint import CheckpointWeights, Family, checkpoint_family, load_config
    from dvd.checkpoint.qwen3vl_config import load_qwen3vl_config

    source = read_source(view)
    rename: Callable[[str], str | None]
    if checkpoint_family(source) is Family.INTERNVL:
        weights = CheckpointWeights(load_config(source))
        rename = weights.llm_weight_name
    else:
        qwen3vl = load_qwen3vl_config(source)
        weights = CheckpointWeights(qwen3vl)
        rename = partial(qwen3vl_weight_name, tied=qwen3vl.tie_word_embeddings)
    for file in weights.files:
        with safe_open(str(file), framework="pt") as handle:
            for stored in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = rename(stored)
                if name is not None:
                    yield name, handle.get_tensor(stored)


def unloaded_parameters(parameter_names: Iterable[str], loaded: set[str]) -> list[str]:
    """The engine's parameters the checkpoint gave no value, sorted."""
    return sorted(name for name in parameter_names if name not in loaded)


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.model_loader import register_model_loader

    from language_server.qwen3vl_view import ARCHITECTURES, MODEL_MODULE

    for architecture in ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, f"{MODEL_MODULE}:{architecture}")
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
