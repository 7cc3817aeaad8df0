"""Writes a small Qwen3-style tokenizer with InternVL3.5's special tokens and chat template.

The regular vocabulary is a byte-level BPE (the same normalizer, split regex and byte-level
mapping as Qwen2/Qwen3's tokenizer.json and transformers' Qwen2Tokenizer) learned from
`corpus.CORPUS`: 256 bytes + 256 merges. Then come, in the real order, Qwen3's 26 added
tokens (151643..151668 in the real tokenizer) and InternVL's 9 (151669..151677: `<img>`,
`</img>`, `<IMG_CONTEXT>`, `<quad>`, `</quad>`, `<ref>`, `</ref>`, `<box>`, `</box>`, added by
InternVL's training code in that order); the -HF release adds `<video>` after them. So a
real id minus 151643 is the tiny id minus 512 for every added token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvd.checkpoint.corpus import CORPUS

if TYPE_CHECKING:
    from tokenizers import Tokenizer

REGULAR_VOCAB = 512  # 256 byte tokens + 256 merges
REAL_FIRST_ADDED_ID = 151643  # <|endoftext|> in Qwen2/Qwen3

# transformers' Qwen2Tokenizer / Qwen's tokenizer.json pre-tokenizer split.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens in id order, with their "special" flag from Qwen3's
# tokenizer_config.json (tool-call, FIM and think markers are added but not special).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
# Qwen3's special_tokens_map.json "additional_special_tokens".
QWEN3_ADDITIONAL_SPECIAL = [content for content, _ in QWEN3_ADDED_TOKENS[1:14]]
INTERNVL_TOKENS: tuple[str, ...] = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
HF_VIDEO_TOKEN = "<video>"

# InternVL3.5's chat_template.jinja (475 bytes; the template of transformers'
# convert_internvl_weights_to_hf.py with "<image>" as the image placeholder).
ORIGINAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<image>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# The -HF releases' chat_template.jinja (481 bytes): the processor's image token is
# <IMG_CONTEXT>, which InternVLProcessor expands to <img><IMG_CONTEXT>*N</img>.
HF_CHAT_TEMPLATE = ORIGINAL_CHAT_TEMPLATE.replace("'<image>\n'", "'<IMG_CONTEXT>\n'")


@dataclass(frozen=True)
class TokenIds:
    """Ids of the tokens that config.json / generation_config.json refer to."""

    length: int  # len(tokenizer): regular vocabulary + added tokens
    bos: int  # <|endoftext|>, Qwen's bos_token_id (the tokenizer itself adds no BOS)
    eos: int  # <|im_end|>
    pad: int  # <|endoftext|>
    img_start: int
    img_end: int
    img_context: int
    im_start: int  # <|im_start|>, which opens every chat turn

    def padded_vocab(self, multiple: int = 64) -> int:
        """The LLM's vocab_size: len(tokenizer) rounded up, as Qwen's 151936 is.

        Rounded from the -HF tokenizer's length (the longer one, with <video>), so that both
        layouts of a preset hold the same LLM."""
        longest = REGULAR_VOCAB + len(added_tokens("hf"))
        return -(-max(self.length, longest) // multiple) * multiple


def added_tokens(layout: str) -> list[tuple[str, bool]]:
    """(content, special) of every added token of `layout`, in id order."""
    tokens = list(QWEN3_ADDED_TOKENS) + [(content, True) for content in INTERNVL_TOKENS]
    if layout == "hf":
        tokens.append((HF_VIDEO_TOKEN, True))
    return tokens


def build_tokenizer(layout: str) -> Tokenizer:
    """The byte-level BPE learned from CORPUS, plus the added tokens of `layout`."""
    return build_tokenizer_with(added_tokens(layout))


def build_tokenizer_with(added: list[tuple[str, bool]]) -> Tokenizer:
    """The byte-level BPE learned from CORPUS, plus `added` ((content, special), in id
    order from REGULAR_VOCAB on). Other families (Qwen3-VL) reuse it with their tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(
        models.BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=REGULAR_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator([CORPUS], trainer=trainer)
    if tokenizer.get_vocab_size() != REGULAR_VOCAB:
        # The corpus must support REGULAR_VOCAB merges, or every added id would move.
        raise RuntimeError(f"BPE learned {tokenizer.get_vocab_size()} tokens, not {REGULAR_VOCAB}")
    for content, special in added:
        token = AddedToken(
            content,
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=special,
        )
        tokenizer.add_tokens([token])
    return tokenizer


def token_ids(layout: str) -> TokenIds:
    """Ids of the tokens config files refer to; no training needed (ids are positional)."""
    ids = {content: REGULAR_VOCAB + i for i, (content, _) in enumerate(added_tokens(layout))}
    return TokenIds(
        length=REGULAR_VOCAB + len(ids),
        bos=ids["<|endoftext|>"],
        eos=ids["<|im_end|>"],
        pad=ids["<|endoftext|>"],
        img_start=ids["<img>"],
        img_end=ids["</img>"],
        img_context=ids["<IMG_CONTEXT>"],
        im_start=ids["<|im_start|>"],
    )


def write_tokenizer_files(out: Path, layout: str, model_max_length: int) -> TokenIds:
    """Writes tokenizer.json, vocab.json, merges.txt, added_tokens.json,
    special_tokens_map.json, tokenizer_config.json and chat_template.jinja."""
    tokenizer = build_tokenizer(layout)
    ids = token_ids(layout)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer.model.save(str(out))  # vocab.json + merges.txt, as Qwen ships them
    added = added_tokens(layout)
    added_ids = {content: REGULAR_VOCAB + i for i, (content, _) in enumerate(added)}
    write_json(out / "added_tokens.json", dict(sorted(added_ids.items())))
    template = HF_CHAT_TEMPLATE if layout == "hf" else ORIGINAL_CHAT_TEMPLATE
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    additional = list(QWEN3_ADDITIONAL_SPECIAL)
    if layout == "hf":
        # transformers' converter adds InternVL's tokens as additional special tokens.
        additional += [*INTERNVL_TOKENS, HF_VIDEO_TOKEN]
    write_json(out / "special_tokens_map.json", _special_tokens_map(additional))
    write_json(
        out / "tokenizer_config.json",
        tokenizer_config(layout, added, additional, template, model_max_length),
    )
    return ids


def _special_tokens_map(additional: list[str]) -> dict[str, Any]:
    def token(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "additional_special_tokens": additional,
        "eos_token": token("<|im_end|>"),
        "pad_token": token("<|endoftext|>"),
    }


def tokenizer_config(
    layout: str,
    added: list[tuple[str, bool]],
    additional: list[str],
    template: str,
    model_max_length: int,
) -> dict[str, Any]:
    """tokenizer_config.json: Qwen3's keys, and InternVLProcessor's on the -HF layout (any
    other `layout` gets Qwen3's alone)."""
    decoder = {
        str(REGULAR_VOCAB + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(added)
    }
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        # Also in chat_template.jinja (where transformers >= 4.47 reads it); kept here for
        # readers of tokenizer_config.json alone.
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if layout == "hf":
        # InternVLProcessor reads these attributes off the tokenizer.
        config["extra_special_tokens"] = {
            "context_image_token": "<IMG_CONTEXT>",
            "end_image_token": "</img>",
            "start_image_token": "<img>",
            "video_token": HF_VIDEO_TOKEN,
        }
        config["processor_class"] = "InternVLProcessor"
        config["return_token_type_ids"] = False
    return config


def write_json(file: Path, data: Any) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
