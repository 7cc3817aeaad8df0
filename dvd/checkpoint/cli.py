"""`dvd make-checkpoint`: writes a random-weight InternVL3.5-like or Qwen3-VL-like checkpoint.

Imports nothing heavy at module level, so that `dvd --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dvd.checkpoint.presets import PRESETS
from dvd.checkpoint.qwen3vl_presets import QWEN3VL_PRESETS
from dvd.flags import add_flag

COMMAND = "make-checkpoint"

_DESCRIPTION = """\
Writes a checkpoint whose WEIGHTS ARE RANDOM (deterministic from --seed): the file layout,
weight names, config.json keys, tokenizer special tokens and chat template of a real
InternVL3.5 or Qwen3-VL release, at a small size. It answers nonsense; it exists so that
tests and benchmarks run the same code paths as a real model without downloading one.

InternVL3.5 presets: tiny (tests: ViT 64x2, LLM 64x2) and small (CPU benchmarks: ViT 256x4,
LLM 512x6, ViT and LLM prefill cost in InternVL3.5-2B's proportion), and variants. layouts:
original (InternVLChatModel, like OpenGVLab/InternVL3_5-8B; the default) and hf
(InternVLForConditionalGeneration, like OpenGVLab/InternVL3_5-8B-HF).

Qwen3-VL presets (Qwen3VLForConditionalGeneration, like Qwen/Qwen3-VL-2B-Instruct; one
layout): qwen3vl-tiny (tests: ViT 64x4, LLM 64x3, 3 DeepStack levels) and qwen3vl-small
(CPU benchmarks: ViT 256x6, LLM 512x6, in Qwen3-VL-2B's proportion); qwen3vl-moe-tiny
(Qwen3VLMoeForConditionalGeneration, like Qwen/Qwen3-VL-30B-A3B-Instruct: tiny with 8
experts of 16 per layer, 2 routed per token)."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the `make-checkpoint` subcommand to an argparse subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="write a random-weight InternVL3.5- or Qwen3-VL-like checkpoint (weights are random)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="folder to write the checkpoint to")
    presets = sorted(PRESETS) + sorted(QWEN3VL_PRESETS)
    add_flag(parser, COMMAND, "--preset", "tiny", "size preset", choices=presets)
    add_flag(
        parser,
        COMMAND,
        "--layout",
        None,
        "file layout of InternVL presets (original by default); Qwen3-VL has only hf",
        choices=["original", "hf"],
    )
    add_flag(parser, COMMAND, "--seed", 0, "seed of the random weights")
    parser.add_argument(
        "--force", action="store_true", help="replace OUT if it already holds a checkpoint"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs `dvd make-checkpoint`; returns the process exit code."""
    from dvd.checkpoint.make import make_checkpoint

    try:
        path = make_checkpoint(
            args.out, preset=args.preset, layout=args.layout, seed=args.seed, force=args.force
        )
    except (ValueError, FileExistsError) as error:
        print(f"dvd {COMMAND}: {error}", file=sys.stderr)
        return 2
    layout = "hf" if args.preset in QWEN3VL_PRESETS else args.layout or "original"
    print(f"wrote {args.preset} {layout}-layout checkpoint (random weights) to {path}")
    return 0
