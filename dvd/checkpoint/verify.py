"""Checks, before anything is served, that a checkpoint's tensors fit its config.json.

A tensor the model needs that is not stored, or stored with another shape, would otherwise
reach the engine as uninitialised memory or a crash deep inside it: a model that answers
garbage without an error. Both servers call these checks at start (the language server for
the LLM, the vision server and coupled mode for the ViT, projector and router) and stop with
a `CheckpointMismatch` that names every offending tensor and the file it is in.

Only the safetensors headers are read here, so the checks cost milliseconds even for a
241B checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dvd.checkpoint import llm_tensors, names
from dvd.checkpoint.config import HF, InternVLConfig
from dvd.checkpoint.weights import CheckpointWeights

log = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class StoredTensor:
    """Where a model tensor comes from: its shape, the stored name(s) and their file."""

    shape: tuple[int, ...]
    stored_names: tuple[str, ...]
    file: Path


class CheckpointMismatch(ValueError):
    """The checkpoint lacks, or mis-sizes, tensors its config.json calls for."""


def compare(
    checkpoint: Path,
    what: str,
    expected: Shapes,
    stored: dict[str, StoredTensor],
    *,
    extra_is_error: bool,
    hint: str = "",
) -> None:
    """Raises CheckpointMismatch listing every missing or mis-shaped tensor (and, with
    extra_is_error, every stored tensor the model has no place for)."""
    lines = []
    for name in sorted(expected):
        if name not in stored:
            lines.append(f"  missing: {name} {_shape(expected[name])}")
        elif stored[name].shape != expected[name]:
            where = stored[name]
            lines.append(
                f"  wrong shape: {' + '.join(where.stored_names)} in {where.file.name} is "
                f"{_shape(where.shape)}, config.json needs {_shape(expected[name])}"
            )
    extra = sorted(set(stored) - set(expected))
    if extra and extra_is_error:
        for name in extra:
            where = stored[name]
            lines.append(
                f"  not part of this model: {' + '.join(where.stored_names)} in {where.file.name}"
            )
    elif extra:
        log.warning(
            "%s: %d stored %s tensors are not used: %s", checkpoint, len(extra), what, extra[:8]
        )
    if lines:
        names_of_files = sorted({t.file.name for t in stored.values()})
        files = ", ".join(names_of_files[:3]) or "no file"
        if len(names_of_files) > 3:
            files += f" and {len(names_of_files) - 3} more"
        raise CheckpointMismatch(
            f"{checkpoint}: the {what} tensors do not fit config.json ({len(lines)} "
            f"problem{'s' if len(lines) > 1 else ''}; "
            f"files read: {files}){hint}:\n" + "\n".join(lines)
        )


def verify_llm(config: InternVLConfig, weights: CheckpointWeights | None = None) -> None:
    """Every LLM tensor config.json calls for is stored with its shape.

    A tied head (config.tie_word_embeddings) is present through the embedding table.
    """
    weights = weights or CheckpointWeights(config)
    tied = config.tie_word_embeddings
    expected, complete = llm_tensors.expected_llm_tensors(config.llm_config, tied)
    stored = stored_llm_tensors(weights)
    if not complete:
        stored = {name: t for name, t in stored.items() if name in expected}
        log.info(
            "%s: %s layers are checked by vLLM's load report, not before start",
            config.path,
            config.llm_config["model_type"],
        )
    if tied and stored.pop(llm_tensors.HEAD, None) is not None:
        log.warning(
            "%s: tie_word_embeddings is true, so the stored lm_head.weight is not used "
            "(the head is the embedding table, as transformers loads it)",
            config.path,
        )
    hint = "" if tied else "; the head is not tied (tie_word_embeddings is false)"
    compare(config.path, "LLM", expected, stored, extra_is_error=False, hint=hint)


def stored_llm_tensors(weights: CheckpointWeights) -> dict[str, StoredTensor]:
    """Plain CausalLM name -> the stored LLM tensor."""
    shapes = weights.shapes()
    out = {}
    for stored in weights.names():
        name = names.llm_weight_name(stored)
        if name is not None:
            out[name] = StoredTensor(shapes[stored], (stored,), weights.file_of(stored))
    return out


def stored_vision_tensors(weights: CheckpointWeights) -> dict[str, StoredTensor]:
    """Original-layout name -> the stored vision, projector or ViR tensor, in either layout.

    -HF's separate q/k/v projections count as one attn.qkv tensor (their rows stacked), as
    `CheckpointWeights.vision_state_dict` loads them. A -HF vision name this layout does not
    define is reported as such rather than dropped.
    """
    if not isinstance(weights.config, InternVLConfig):
        raise TypeError(f"{weights.config.path}: stored_vision_tensors reads InternVL names")
    shapes = weights.shapes()
    out: dict[str, StoredTensor] = {}
    for stored in weights.names():
        file = weights.file_of(stored)
        if weights.config.layout != HF:
            if names.is_original_vision_name(stored):
                out[stored] = StoredTensor(shapes[stored], (stored,), file)
        elif names.is_hf_vision_name(stored):
            try:
                original, part = names.hf_to_original_vision(stored)
            except ValueError:
                out[stored] = StoredTensor(shapes[stored], (stored,), file)
                continue
            if part is None or original not in out:
                out[original] = StoredTensor(shapes[stored], (stored,), file)
            else:
                before = out[original]
                rows = before.shape[0] + shapes[stored][0]
                out[original] = StoredTensor(
                    (rows, *before.shape[1:]), (*before.stored_names, stored), file
                )
    return out


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
