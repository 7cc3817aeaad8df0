"""Qwen3-VL on vLLM, fed with the vision server's rows: the engine and its request.

The prompt keeps one `<|vision_start|><|image_pad|><|vision_end|>` per image (for a video,
`<|vision_start|><|video_pad|><|vision_end|>`), in the order of the items; vLLM expands each
pad to the item's token count from its grid and computes the MRoPE positions from the
token ids and the grids itself (docs/qwen3vl.md §1). Each item's rows are
[main | deepstack_1..k] (out_hidden x (1 + k) wide), as `vision_server.qwen3vl` sends them;
our model class keeps DeepStack on (language_server/qwen3vl_model.py). Each item carries a
content hash, given to vLLM as its `multi_modal_uuids`, so the prefix cache keys on images
without hashing tensors.

`qwen3vl_request` checks the items against the checkpoint's config and builds vLLM's
prompt dict (no vLLM import); `Qwen3VLEngine` starts vLLM on the Qwen3-VL view and
generates from a prompt and its items.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig
from language_server.engine import EngineSettings, LlmEngine, Sampling, TokenDelta
from language_server.llm_view import read_source
from language_server.qwen3vl_view import QWEN3VL_ENGINE_ARGS

log = logging.getLogger(__name__)

MODALITIES = ("image", "video")


@dataclass(frozen=True)
class VisionItem:
    """One image's or video's rows from the vision server."""

    modality: str  # "image" or "video"
    rows: torch.Tensor  # (t * h * w / merge^2, out_hidden * (1 + k)), any float dtype
    grid_thw: tuple[int, int, int]  # patches; t = 1 for an image, temporal patches for video
    uuid: str  # the content hash: vLLM's prefix and encoder caches key on it
    timestamps: tuple[float, ...] = ()  # video: seconds of each temporal patch (t of them)


def qwen3vl_request(
    config: Qwen3VLConfig, prompt: str | Sequence[int], items: Sequence[VisionItem]
) -> dict[str, Any]:
    """vLLM's prompt dict for `prompt` (text, or token ids) and its items in prompt order.

    ValueError when an item's rows do not fit its grid or the checkpoint's row width, or
    when the prompt's pads (token ids only; text is tokenized by vLLM) do not match the
    items.
    """
    for index, item in enumerate(items):
        _check_item(config, index, item)
    request: dict[str, Any] = (
        {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
    )
    if not isinstance(prompt, str):
        pads = {"image": config.image_token_id, "video": config.video_token_id}
        for modality, pad in pads.items():
            found = sum(1 for token in prompt if token == pad)
            given = sum(1 for item in items if item.modality == modality)
            if found != given:
                raise ValueError(
                    f"the prompt has {found} <|{modality}_pad|> tokens for {given} {modality} "
                    "items (one pad per item; vLLM expands it)"
                )
    if not items:
        return request
    data: dict[str, Any] = {}
    uuids: dict[str, list[str]] = {}
    for modality in MODALITIES:
        chosen = [item for item in items if item.modality == modality]
        if not chosen:
            continue
        fields: dict[str, Any] = {
            f"{modality}_embeds": torch.cat([item.rows for item in chosen]),
            f"{modality}_grid_thw": torch.tensor([item.grid_thw for item in chosen]),
        }
        if modality == "video":
            fields["timestamps"] = [list(item.timestamps) for item in chosen]
        data[modality] = fields
        uuids[modality] = [item.uuid for item in chosen]
    request["multi_modal_data"] = data
    request["multi_modal_uuids"] = uuids
    return request


def _check_item(config: Qwen3VLConfig, index: int, item: VisionItem) -> None:
    where = f"item {index} ({item.modality})"
    if item.modality not in MODALITIES:
        raise ValueError(f"{where}: modality is not one of {MODALITIES}")
    if len(item.grid_thw) != 3 or min(item.grid_thw) < 1:
        raise ValueError(f"{where}: grid_thw {item.grid_thw} is not three positive numbers")
    t, h, w = item.grid_thw
    merge = config.vision.spatial_merge_size
    if h % merge or w % merge:
        raise ValueError(f"{where}: grid_thw {item.grid_thw} does not fit a {merge}x{merge} merge")
    if item.modality == "image" and t != 1:
        raise ValueError(f"{where}: grid_thw {item.grid_thw}: an image has one temporal patch")
    expected = (config.tokens_of_grid(t, h, w), config.feature_width)
    if item.rows.ndim != 2 or tuple(item.rows.shape) != expected:
        raise ValueError(
            f"{where}: rows {tuple(item.rows.shape)}, expected {expected} (grid {item.grid_thw}; "
            f"[main | {config.vision.deepstack_levels} DeepStack levels] x "
            f"{config.vision.out_hidden_size})"
        )
    if not item.rows.is_floating_point():
        raise ValueError(f"{where}: rows are {item.rows.dtype}, not floating point")
    if item.modality == "video" and len(item.timestamps) != t:
        raise ValueError(f"{where}: {len(item.timestamps)} timestamps for {t} temporal patches")
    if not item.uuid:
        raise ValueError(f"{where}: no content hash (uuid)")


class Qwen3VLEngine:
    """vLLM's Qwen3-VL model on the LLM side only, DeepStack kept."""

    def __init__(self, config: Qwen3VLConfig, engine: LlmEngine) -> None:
        self.config = config
        self.engine = engine

    @classmethod
    def start(cls, config: Qwen3VLConfig, settings: EngineSettings) -> Qwen3VLEngine:
        """Starts vLLM on `settings.view`, a view `prepare_qwen3vl_view(config, ...)` made;
        the view's engine arguments replace any others. VllmDoesNotFit (before vLLM starts)
        when the installed vLLM's Qwen3-VL class does not have what our subclass needs."""
        from language_server.qwen3vl_model import check_installed_vllm

        check_installed_vllm()
        source = read_source(settings.view)
        if source.resolve() != Path(config.path).resolve():
            raise ValueError(f"{settings.view} is a view of {source}, not of {config.path}")
        settings = dataclasses.replace(settings, view_args=QWEN3VL_ENGINE_ARGS)
        return cls(config, LlmEngine.start(settings))

    def shutdown(self) -> None:
        self.engine.shutdown()

    async def generate(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        items: Sequence[VisionItem],
        sampling: Sampling,
    ) -> AsyncIterator[TokenDelta]:
        request = qwen3vl_request(self.config, prompt, items)
        async for delta in self.engine.generate_prompt(request_id, request, sampling):
            yield delta

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)
