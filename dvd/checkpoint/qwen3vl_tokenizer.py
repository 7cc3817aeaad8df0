"""The tokenizer files of a Qwen3-VL checkpoint: Qwen3's added tokens and Qwen3-VL's chat
template, on the small byte-level BPE of `tokenizer.py`.

Qwen3-VL uses Qwen3's tokenizer unchanged: the regular vocabulary, then 26 added tokens from
151643 (<|endoftext|>) to 151668 (</think>); config.json's vision_start_token_id 151652,
vision_end_token_id 151653, image_token_id 151655 (<|image_pad|>) and video_token_id 151656
(<|video_pad|>) point into them. Here the added tokens start at REGULAR_VOCAB (512), so a
real id minus 151643 equals the tiny id minus 512 for every one of them.

A release ships tokenizer.json, tokenizer_config.json, vocab.json and merges.txt, and its
chat template in chat_template.json (the processor's file, {"chat_template": ...}); there is
no added_tokens.json or special_tokens_map.json.

The chat template renders what the Qwen3-VL-*-Instruct template renders (its output format
is the contract; the template text here is our own): no default system prompt; an image is
`<|vision_start|><|image_pad|><|vision_end|>` and a video `<|vision_start|><|video_pad|>
<|vision_end|>` (no newline), optionally preceded by "Picture N: " / "Video N: " when
add_vision_id is set; Qwen's tool-calling system block and <tool_call>/<tool_response>
turns; a system message is rendered only when it comes first. Video timestamps are NOT in
the template: the processor (transformers' Qwen3VLProcessor.replace_video_token, vLLM's
Qwen3VLMultiModalProcessor.get_video_repl) expands the <|video_pad|> into
"<{t:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>" per temporal patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dvd.checkpoint.tokenizer import (
    QWEN3_ADDED_TOKENS,
    QWEN3_ADDITIONAL_SPECIAL,
    REGULAR_VOCAB,
    build_tokenizer_with,
    tokenizer_config,
    write_json,
)

TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _jinja_string(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


# Macros: `text_of` (system and assistant turns: text parts only) and `with_media` (user and
# tool turns: images and videos become their placeholders, counted across the chat).
CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}"
    "{%- for part in content if 'text' in part -%}{{ part.text }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro with_media(content, seen) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set seen.images = seen.images + 1 -%}"
    "{%- if add_vision_id -%}Picture {{ seen.images }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type == 'video' or 'video' in part -%}"
    "{%- set seen.videos = seen.videos + 1 -%}"
    "{%- if add_vision_id -%}Video {{ seen.videos }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part -%}{{ part.text }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set opening_system = messages and messages[0].role == 'system' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if opening_system -%}{{- text_of(messages[0].content) + '\\n\\n' -}}{%- endif -%}"
    "{{- " + _jinja_string(TOOLS_INTRO) + " -}}"
    "{%- for tool in tools -%}{{- '\\n' + tool | tojson -}}{%- endfor -%}"
    "{{- " + _jinja_string(TOOLS_OUTRO + "<|im_end|>\n") + " -}}"
    "{%- elif opening_system -%}"
    "{{- '<|im_start|>system\\n' + text_of(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- set seen = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{- '<|im_start|>user\\n' + with_media(message.content, seen) + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + text_of(message.content) -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- if not loop.first or message.content -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set call = call.function or call -%}"
    '{{- \'<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' -}}'
    "{{- call.arguments if call.arguments is string else call.arguments | tojson -}}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + with_media(message.content, seen) + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Qwen3VLTokenIds:
    """Ids of the tokens config.json / generation_config.json refer to."""

    length: int  # len(tokenizer)
    endoftext: int  # <|endoftext|>: bos_token_id and pad_token_id (the tokenizer adds no BOS)
    im_start: int
    im_end: int  # eos_token_id; generation_config's eos is [im_end, endoftext]
    vision_start: int
    vision_end: int
    image_pad: int  # image_token_id
    video_pad: int  # video_token_id

    def padded_vocab(self, multiple: int = 64) -> int:
        """The LLM's vocab_size: len(tokenizer) rounded up, as Qwen's 151936 is."""
        return -(-self.length // multiple) * multiple


def qwen3vl_token_ids() -> Qwen3VLTokenIds:
    """The ids, which follow from the order of QWEN3_ADDED_TOKENS alone."""
    ids = {content: REGULAR_VOCAB + i for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS)}
    return Qwen3VLTokenIds(
        length=REGULAR_VOCAB + len(ids),
        endoftext=ids["<|endoftext|>"],
        im_start=ids["<|im_start|>"],
        im_end=ids["<|im_end|>"],
        vision_start=ids["<|vision_start|>"],
        vision_end=ids["<|vision_end|>"],
        image_pad=ids["<|image_pad|>"],
        video_pad=ids["<|video_pad|>"],
    )


def write_qwen3vl_tokenizer_files(out: Path, model_max_length: int) -> Qwen3VLTokenIds:
    """Writes tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and
    chat_template.json, as a Qwen3-VL release has them."""
    added = list(QWEN3_ADDED_TOKENS)
    tokenizer = build_tokenizer_with(added)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer.model.save(str(out))  # vocab.json + merges.txt
    config = tokenizer_config(
        "qwen3_vl", added, list(QWEN3_ADDITIONAL_SPECIAL), CHAT_TEMPLATE, model_max_length
    )
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return qwen3vl_token_ids()
