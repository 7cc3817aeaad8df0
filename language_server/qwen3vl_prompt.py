"""Qwen3-VL prompt assembly: the checkpoint's chat template, one pad per image or video.

Each image part becomes `{"type": "image"}` in the message's content, which the chat
template writes as `<|vision_start|><|image_pad|><|vision_end|>`; the prompt handed to vLLM
keeps that single pad and vLLM expands it to the image's tokens from its grid (and computes
the MRoPE positions itself). Each video part becomes `{"type": "video"}`, which the template
writes as `<|vision_start|><|video_pad|><|vision_end|>`; vLLM is given the bare
`<|video_pad|>` and writes `<t seconds><|vision_start|><|video_pad|> x n<|vision_end|>` per
temporal patch from the item's timestamps, the format the releases were trained on
(transformers 4.57's processor replaced the whole triple; docs/qwen3vl.md §4). The rows,
grids, content keys (and a video's times) come from the vision server (one VisionItem per
item, `multi_modal_uuids` = the content key); `token_ids` is the prompt as vLLM will expand
it, so usage counts what the grids imply.

A video travels as ONE item (`VideoClip`: its frames and each frame's time), not as frames:
Qwen3-VL pairs consecutive frames into temporal patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig
from dvd.errors import InvalidInput
from dvd.v1 import language_pb2
from language_server.chat_prompt import ROLES
from language_server.image_features import EncodedImages, VideoClip
from language_server.qwen3vl_engine import VisionItem, qwen3vl_request
from language_server.video_prompt import VisualInput, visual_inputs

VISION_PARTS = {"image": "image", "video": "video"}
"""ContentPart kinds that are vision items -> the chat template's content type."""


@dataclass(frozen=True)
class Qwen3VLRendered:
    """The templated chat as vLLM's prompt: token ids with one <|image_pad|> per image
    (inside its markers) and one bare <|video_pad|> per video."""

    ids: list[int]
    modalities: tuple[str, ...]  # "image" / "video" per item, in prompt order

    @property
    def num_images(self) -> int:
        return len(self.modalities)


@dataclass(frozen=True)
class Qwen3VLPrompt:
    token_ids: list[int]  # every pad expanded as vLLM expands it (usage counts these)
    image_tokens: int  # every item's rows and markers (a video's timestamps too)
    request: dict[str, Any]  # vLLM's prompt dict (qwen3vl_request)
    video_tokens: int = 0  # of image_tokens, the videos'

    def engine_input(self) -> dict[str, Any]:
        return self.request


class Qwen3VLPromptBuilder:
    accepts_video = True
    """A video part is one item: its frames and times (VideoClip) to the vision side."""

    def __init__(self, tokenizer: Any, config: Qwen3VLConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.reserved = {
            config.image_token_id,
            config.video_token_id,
            config.vision_start_token_id,
            config.vision_end_token_id,
        }

    @classmethod
    def from_checkpoint(cls, config: Qwen3VLConfig, tokenizer_dir: Path) -> Qwen3VLPromptBuilder:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
        return cls(tokenizer, config)

    def visual_inputs(
        self, messages: list[language_pb2.ChatMessage], max_images: int
    ) -> list[VisualInput]:
        """Images, and each video as one item."""
        return visual_inputs(messages, max_images, clip=video_clip)

    def render(self, messages: list[language_pb2.ChatMessage]) -> Qwen3VLRendered:
        if not messages:
            raise InvalidInput("messages must not be empty")
        chat = [{"role": self._role(m.role), "content": self._content(m)} for m in messages]
        modalities = tuple(
            VISION_PARTS[kind]
            for m in messages
            for part in m.content
            if (kind := part.WhichOneof("kind") or "") in VISION_PARTS
        )
        images, videos = modalities.count("image"), modalities.count("video")
        try:
            text = self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises on conversations the template rejects
            raise InvalidInput(f"chat template rejected the conversation: {exc}") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        config = self.config
        counts = {token: sum(1 for t in ids if t == token) for token in self.reserved}
        expected = {
            config.image_token_id: images,
            config.video_token_id: videos,
            config.vision_start_token_id: images + videos,
            config.vision_end_token_id: images + videos,
        }
        if counts != expected:
            raise InvalidInput(
                "message text contains a reserved vision token (<|vision_start|>, "
                "<|vision_end|>, <|image_pad|> or <|video_pad|>); send images and videos as "
                "image and video parts"
            )
        return Qwen3VLRendered(self._bare_video_pads(ids), modalities)

    def _bare_video_pads(self, ids: list[int]) -> list[int]:
        """`ids` with each <|vision_start|><|video_pad|><|vision_end|> cut to the bare pad:
        vLLM writes a video's markers per temporal patch around its timestamps."""
        config = self.config
        out: list[int] = []
        for index, token in enumerate(ids):
            after, before = ids[index + 1 : index + 2], ids[index - 1 : index] if index else []
            if token == config.vision_start_token_id and after == [config.video_token_id]:
                continue
            if token == config.vision_end_token_id and before == [config.video_token_id]:
                continue
            out.append(token)
        return out

    def _role(self, role: str) -> str:
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role

    def _content(self, message: language_pb2.ChatMessage) -> list[dict[str, str]]:
        parts = []
        for part in message.content:
            kind = part.WhichOneof("kind") or ""
            if kind in VISION_PARTS:
                if message.role != "user":
                    raise InvalidInput(
                        f"{kind}s are only allowed in user messages, not {message.role}"
                    )
                parts.append({"type": VISION_PARTS[kind]})
            else:
                parts.append({"type": "text", "text": part.text})
        return parts

    def assemble_images(self, rendered: Qwen3VLRendered, encoded: EncodedImages) -> Qwen3VLPrompt:
        """The items from the vision server's rows, grids, content keys and video times,
        and vLLM's request (its tensors are copies: the transport's memory may be released
        after); ValueError when what the vision server sent does not fit the prompt."""
        items = self._items(rendered, encoded)
        request = qwen3vl_request(self.config, rendered.ids, items)  # checks items and pads
        expansions = [self._expansion(item) for item in items]
        expanded: list[int] = []
        replacements = iter(expansions)
        pads = {self.config.image_token_id, self.config.video_token_id}
        for token in rendered.ids:
            expanded += next(replacements) if token in pads else [token]
        # an image's <|vision_start|>/<|vision_end|> stay around its pad; a video's markers
        # are in its expansion
        paired = list(zip(items, expansions, strict=True))
        image_tokens = sum(len(e) + 2 for item, e in paired if item.modality == "image")
        video_tokens = sum(len(e) for item, e in paired if item.modality == "video")
        return Qwen3VLPrompt(expanded, image_tokens + video_tokens, request, video_tokens)

    def _items(self, rendered: Qwen3VLRendered, encoded: EncodedImages) -> list[VisionItem]:
        count = len(encoded.features)
        if count != rendered.num_images:
            raise ValueError(f"{rendered.num_images} image and video slots but {count} items")
        if len(encoded.grids) != count or len(encoded.content_keys) != count:
            raise ValueError("the vision server sent no grid or content key for some items")
        times = encoded.timestamps or [()] * count
        items = []
        for modality, rows, grid, key, seconds in zip(
            rendered.modalities,
            encoded.features,
            encoded.grids,
            encoded.content_keys,
            times,
            strict=True,
        ):
            if len(grid) != 3:
                raise ValueError(f"grid_thw {list(grid)} is not (t, h, w)")
            t, h, w = (int(v) for v in grid)
            items.append(VisionItem(modality, rows, (t, h, w), key, tuple(seconds)))
        return items

    def _expansion(self, item: VisionItem) -> list[int]:
        """What vLLM makes of the item's pad: an image's rows; per temporal patch of a video,
        its `<t seconds>` text (tokenized alone, as vLLM's get_video_repl does), then
        <|vision_start|>, its rows' pads, <|vision_end|>."""
        config = self.config
        if item.modality == "image":
            return [config.image_token_id] * int(item.rows.shape[0])
        per_patch = config.tokens_of_grid(1, *item.grid_thw[1:])
        out: list[int] = []
        for seconds in item.timestamps:
            out += self.tokenizer.encode(f"<{seconds:.1f} seconds>", add_special_tokens=False)
            out += [config.vision_start_token_id]
            out += [config.video_token_id] * per_patch + [config.vision_end_token_id]
        return out


def video_clip(video: language_pb2.VideoFrames) -> VideoClip:
    """A video part as one item: its frames and each frame's time, by Qwen3-VL's processor's
    rule (frame index / the video's fps, `Qwen3VLProcessor._calculate_timestamps`) when the
    gateway sent the indices and rate, else the frames' presentation times."""
    frames = tuple(video.frames)
    if video.source_fps > 0 and len(video.frame_indices) == len(frames):
        times = tuple(index / video.source_fps for index in video.frame_indices)
    elif len(video.timestamps_s) == len(frames):
        times = tuple(video.timestamps_s)
    else:
        raise InvalidInput(
            "a video part has neither frame indices with a frame rate nor a time per frame: "
            "Qwen3-VL writes each frame pair's time into the prompt"
        )
    return VideoClip(frames, times)
