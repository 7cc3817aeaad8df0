"""Prompt assembly: chat template, image slots, and the prompt embeddings vLLM receives.

Each image part of a message becomes InternVL's placeholder line, each video part its frame
lines (language_server/video_prompt.py: "Frame1: <image>" ..., one slot per frame); after
the tokenizer's own chat template is applied, every placeholder expands to `<img>` +
`<IMG_CONTEXT>` x n + `</img>`, with n the feature rows received for that image. Text is
embedded with the LLM's own embedding table and the features are written into the
`<IMG_CONTEXT>` rows, so vLLM sees exactly what the coupled model would compute before its
first layer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from dvd.checkpoint import CheckpointWeights, InternVLConfig
from dvd.errors import InvalidInput
from dvd.v1 import language_pb2
from language_server.image_features import EncodedImages
from language_server.video_prompt import VisualInput, frame_prompt, visual_inputs

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RenderedChat:
    """The templated prompt as token-id segments between image slots."""

    segments: list[list[int]]  # len = images + 1
    frame_slots: tuple[bool, ...] = ()
    """Per slot, whether it is a video frame's (empty: none is)."""

    @property
    def num_images(self) -> int:
        return len(self.segments) - 1

    @property
    def text_tokens(self) -> int:
        return sum(len(segment) for segment in self.segments)


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    embeds: torch.Tensor  # [tokens, hidden]
    image_tokens: int
    video_tokens: int = 0
    """Of image_tokens, those of video frames."""

    def engine_input(self) -> dict[str, Any]:
        """What vLLM is given (LlmEngine.generate_prompt)."""
        return {"prompt_embeds": self.embeds}


class BuiltPrompt(Protocol):
    """A family's assembled prompt, as the service uses it."""

    @property
    def token_ids(self) -> list[int]:
        """The prompt's tokens with every image expanded (its length is what usage counts)."""
        ...

    @property
    def image_tokens(self) -> int: ...

    @property
    def video_tokens(self) -> int:
        """Of image_tokens, those of video frames."""
        ...

    def engine_input(self) -> dict[str, Any]: ...


class ChatPromptBuilder(Protocol):
    """A family's prompt assembly: InternVL's PromptBuilder, Qwen3-VL's
    (language_server/qwen3vl_prompt.py)."""

    accepts_video: bool
    """Whether video parts can be served (LanguageInfo.accepts_video)."""

    def visual_inputs(
        self, messages: list[language_pb2.ChatMessage], max_images: int
    ) -> list[VisualInput]:
        """What the vision side encodes, in prompt order (video_prompt.visual_inputs)."""
        ...

    def render(self, messages: list[language_pb2.ChatMessage]) -> Any:
        """The templated chat with one slot per image; InvalidInput if it cannot be."""
        ...

    def assemble_images(self, rendered: Any, encoded: EncodedImages) -> BuiltPrompt: ...


class PromptBuilder:
    accepts_video = True  # a video's frames as images, in InternVL's frame prompt

    def __init__(self, tokenizer, embed_table: torch.Tensor, config: InternVLConfig) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.embed_table = embed_table
        self.img_start_id = self._token_id(config.img_start_token)
        self.img_end_id = self._token_id(config.img_end_token)
        self.img_context_id = self._token_id(config.img_context_token)
        # A per-process marker that no template rewrites and no user text contains.
        self._slot = f"<dvd-image-{uuid.uuid4().hex}>"

    @classmethod
    def from_checkpoint(
        cls, config: InternVLConfig, tokenizer_dir: Path, dtype: torch.dtype
    ) -> PromptBuilder:
        """`tokenizer_dir` is the LLM view (llm_view.py): the tokenizer files beside the LLM's
        own config.json, so transformers never looks at the VLM config's remote-code map."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
        table = CheckpointWeights(config).embed_tokens().to(dtype)
        return cls(tokenizer, table, config)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token")
        return int(ids[0])

    def visual_inputs(
        self, messages: list[language_pb2.ChatMessage], max_images: int
    ) -> list[VisualInput]:
        """Images, and each video's frames as images of one tile."""
        return visual_inputs(messages, max_images)

    def render(self, messages: list[language_pb2.ChatMessage]) -> RenderedChat:
        """Applies the chat template; the result has one slot per image, in order."""
        if not messages:
            raise InvalidInput("messages must not be empty")
        frame_slots: list[bool] = []
        chat = [
            {"role": self._role(m.role), "content": self._content(m, frame_slots)} for m in messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises on conversations the template rejects
            raise InvalidInput(f"chat template rejected the conversation: {exc}") from None
        segments = [
            self.tokenizer.encode(p, add_special_tokens=False) for p in text.split(self._slot)
        ]
        reserved = {self.img_start_id, self.img_end_id, self.img_context_id}
        if any(token in reserved for segment in segments for token in segment):
            raise InvalidInput(
                "message text contains a reserved image token "
                "(<img>, </img> or <IMG_CONTEXT>); send images as image parts"
            )
        if len(frame_slots) != len(segments) - 1:
            raise InvalidInput("the chat template dropped or repeated an image")
        return RenderedChat(segments, tuple(frame_slots))

    def _role(self, role: str) -> str:
        if role not in ROLES:
            raise InvalidInput(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role

    def _content(self, message: language_pb2.ChatMessage, frame_slots: list[bool]) -> str:
        """The message's text with a slot per image and per video frame, in order; each
        slot's kind is appended to `frame_slots`."""
        parts = []
        for part in message.content:
            kind = part.WhichOneof("kind")
            if kind in ("image", "video") and message.role != "user":
                raise InvalidInput(f"{kind}s are only allowed in user messages, not {message.role}")
            if kind == "image":
                parts.append(f"{self._slot}")
                frame_slots.append(False)
            elif kind == "video":
                parts.append(frame_prompt(len(part.video.frames), self._slot))
                frame_slots += [True] * len(part.video.frames)
            else:
                parts.append(part.text)
        return "\n".join(parts)

    def assemble_images(self, rendered: RenderedChat, encoded: EncodedImages) -> Prompt:
        return self.assemble(rendered, encoded.features)

    def assemble(self, rendered: RenderedChat, features: list[torch.Tensor]) -> Prompt:
        """Expands the slots to n rows each and writes the features into them."""
        if len(features) != rendered.num_images:
            raise ValueError(f"{rendered.num_images} image slots but {len(features)} images")
        ids: list[int] = list(rendered.segments[0])
        for image, segment in zip(features, rendered.segments[1:], strict=True):
            ids += [self.img_start_id] + [self.img_context_id] * image.shape[0] + [self.img_end_id]
            ids += segment
        token_ids = torch.tensor(ids, dtype=torch.long)
        embeds = F.embedding(token_ids, self.embed_table)
        if features:
            slots = token_ids == self.img_context_id
            embeds[slots] = torch.cat(features).to(embeds.dtype)
        image_tokens = sum(int(f.shape[0]) + 2 for f in features)
        frames = rendered.frame_slots or (False,) * len(features)
        video_tokens = sum(int(f.shape[0]) + 2 for f, x in zip(features, frames, strict=True) if x)
        return Prompt(ids, embeds, image_tokens, video_tokens)
