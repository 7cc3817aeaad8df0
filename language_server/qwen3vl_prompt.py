"""Qwen3-VL prompt assembly: the checkpoint's chat template, one pad per image.

Each image part becomes `{"type": "image"}` in the message's content, which the chat
template writes as `<|vision_start|><|image_pad|><|vision_end|>`; the prompt handed to vLLM
keeps that single pad and vLLM expands it to the image's tokens from its grid (and computes
the MRoPE positions itself). The rows, grids and content keys come from the vision server
(one VisionItem per image, `multi_modal_uuids` = the content key); `token_ids` is the
prompt as vLLM will expand it, so usage counts what the grids imply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig
from dvd.errors import InvalidInput
from dvd.v1 import language_pb2
from language_server.chat_prompt import ROLES
from language_server.image_features import EncodedImages
from language_server.qwen3vl_engine import VisionItem, qwen3vl_request


@dataclass(frozen=True)
class Qwen3VLRendered:
    """The templated chat as token ids with one <|image_pad|> per image."""

    ids: list[int]
    num_images: int


@dataclass(frozen=True)
class Qwen3VLPrompt:
    token_ids: list[int]  # every pad expanded to its image's tokens
    image_tokens: int  # image rows plus their <|vision_start|>/<|vision_end|>
    request: dict[str, Any]  # vLLM's prompt dict (qwen3vl_request)
    video_tokens: int = 0  # video input is not served for Qwen3-VL yet

    def engine_input(self) -> dict[str, Any]:
        return self.request


class Qwen3VLPromptBuilder:
    accepts_video = False
    """Qwen3-VL video (frames with their timestamps) is not served yet: the gateway refuses
    video parts for this model, and a video part that arrives anyway is an InvalidInput."""

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

    def render(self, messages: list[language_pb2.ChatMessage]) -> Qwen3VLRendered:
        if not messages:
            raise InvalidInput("messages must not be empty")
        chat = [{"role": self._role(m.role), "content": self._content(m)} for m in messages]
        images = sum(
            1 for m in messages for part in m.content if part.WhichOneof("kind") == "image"
        )
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
            config.video_token_id: 0,
            config.vision_start_token_id: images,
            config.vision_end_token_id: images,
        }
        if counts != expected:
            raise InvalidInput(
                "message text contains a reserved vision token (<|vision_start|>, "
                "<|vision_end|>, <|image_pad|> or <|video_pad|>); send images as image parts"
            )
        return Qwen3VLRendered(ids, images)

    def _role(self, role: str) -> str:
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role

    def _content(self, message: language_pb2.ChatMessage) -> list[dict[str, str]]:
        parts = []
        for part in message.content:
            if part.WhichOneof("kind") == "video":
                raise InvalidInput("video input is not served for Qwen3-VL models yet")
            if part.WhichOneof("kind") == "image":
                if message.role != "user":
                    raise InvalidInput(
                        f"images are only allowed in user messages, not {message.role}"
                    )
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        return parts

    def assemble_images(self, rendered: Qwen3VLRendered, encoded: EncodedImages) -> Qwen3VLPrompt:
        """The items from the vision server's rows, grids and content keys, and vLLM's
        request (its tensors are copies: the transport's memory may be released after)."""
        count = len(encoded.features)
        if count != rendered.num_images:
            raise ValueError(f"{rendered.num_images} image slots but {count} images")
        if len(encoded.grids) != count or len(encoded.content_keys) != count:
            raise ValueError("the vision server sent no grid or content key for some images")
        items = []
        for rows, grid, key in zip(
            encoded.features, encoded.grids, encoded.content_keys, strict=True
        ):
            if len(grid) != 3:
                raise ValueError(f"grid_thw {list(grid)} is not (t, h, w)")
            t, h, w = (int(v) for v in grid)
            items.append(VisionItem("image", rows, (t, h, w), key))
        request = qwen3vl_request(self.config, rendered.ids, items)
        expanded: list[int] = []
        tokens = iter(int(item.rows.shape[0]) for item in items)
        for token in rendered.ids:
            if token == self.config.image_token_id:
                expanded += [token] * next(tokens)
            else:
                expanded.append(token)
        image_tokens = sum(int(item.rows.shape[0]) + 2 for item in items)
        return Qwen3VLPrompt(expanded, image_tokens, request)
