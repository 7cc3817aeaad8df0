"""`dvd make-checkpoint`: writes a random-weight InternVL3.5-like checkpoint.

Imports nothing heavy at module level, so that `dvd --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dvd.checkpoint.presets import PRESETS
from dvd.flags import add_flag

COMMAND = "make-checkpoint"

_DESCRIPTION = """\
Writes a checkpoint whose WEIGHTS ARE RANDOM (deterministic from --seed): the file layout,
weight names, config.json keys, tokenizer special tokens and chat template of a real
InternVL3.5 release, at a small size. It answers nonsense; it exists so that tests and
benchmarks run the same code paths as a real model without downloading one.

presets: tiny (tests: ViT 64x2, LLM 64x2) and small (CPU benchmarks: ViT 256x4, LLM 512x6,
ViT and LLM prefill cost in InternVL3.5-2B's proportion). layouts: original
(InternVLChatModel, like OpenGVLab/InternVL3_5-8B) and hf (InternVLForConditionalGeneration,
like OpenGVLab/InternVL3_5-8B-HF)."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the `make-checkpoint` subcommand to an argparse subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        COMMAND,
        help="write a random-weight InternVL3.5-like checkpoint (weights are random)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="folder to write the checkpoint to")
    add_flag(parser, COMMAND, "--preset", "tiny", "size preset", choices=sorted(PRESETS))
    add_flag(parser, COMMAND, "--layout", "original", "file layout", choices=["original", "hf"])
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
    print(f"wrote {args.preset} {args.layout}-layout checkpoint (random weights) to {path}")
    return 0
