"""The affinity key of a conversation: what `--language-routing prefix-affine` hashes.

A chat client sends the whole conversation every turn, so turn N+1 starts with turn N's
messages, and the language server that served turn N holds their KV blocks in vLLM's prefix
cache. The key is the conversation's leading messages: every message up to and including
the first user message (a system prompt, then the first question with its images). Those
stay the same from turn to turn, while the later messages keep growing; two conversations
that share a system prompt but ask different first questions get different keys, so they
spread over the pool instead of piling onto one server.

Images enter by the hash of their bytes, so the key costs one pass over the image bytes and
stays small.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from dvd.v1 import language_pb2


def leading_messages(
    messages: Sequence[language_pb2.ChatMessage],
) -> list[language_pb2.ChatMessage]:
    """The messages up to and including the first user message (all of them if none is)."""
    for index, message in enumerate(messages):
        if message.role == "user":
            return list(messages[: index + 1])
    return list(messages)


def conversation_key(request: language_pb2.GenerateRequest) -> bytes:
    """A 16-byte digest of the request's leading messages: roles, texts, image hashes."""
    digest = hashlib.blake2b(digest_size=16)
    for message in leading_messages(request.messages):
        _add(digest, b"role", message.role.encode())
        for part in message.content:
            kind = part.WhichOneof("kind")
            if kind == "image":
                _add(digest, b"image", hashlib.sha256(part.image).digest())
            elif kind == "video":
                for frame in part.video.frames:
                    _add(digest, b"frame", hashlib.sha256(frame).digest())
            else:
                _add(digest, b"text", part.text.encode())
    return digest.digest()


def _add(digest: hashlib.blake2b, kind: bytes, data: bytes) -> None:
    """Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently."""
    digest.update(kind + len(data).to_bytes(8, "little") + data)
