"""Which model family a checkpoint folder holds, read from its config.json alone.

This is the one place the rest of the code asks "which family?": the servers and `dvd up`
call `checkpoint_family` (or `require_servable`, which also says whether this version can
serve it) before anything heavy is loaded, and branch on the answer.

| family | config.json architectures[0] | model_type |
| --- | --- | --- |
| internvl | InternVLChatModel / InternVLForConditionalGeneration | internvl_chat / internvl |
| qwen3_vl | Qwen3VLForConditionalGeneration | qwen3_vl |
| qwen3_vl_moe | Qwen3VLMoeForConditionalGeneration (30B-A3B, 235B-A22B) | qwen3_vl_moe |

`architectures` decides when present (it names the class that reads the weights); the
model_type is the fallback, as transformers' Auto classes use it.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path


class Family(str, Enum):
    """A model family: how its checkpoint is read and how its features reach the LLM."""

    INTERNVL = "internvl"
    QWEN3_VL = "qwen3_vl"
    QWEN3_VL_MOE = "qwen3_vl_moe"

    @property
    def display_name(self) -> str:
        return _TITLES[self]


_TITLES = {
    Family.INTERNVL: "InternVL",
    Family.QWEN3_VL: "Qwen3-VL",
    Family.QWEN3_VL_MOE: "Qwen3-VL-MoE",
}
ARCHITECTURES = {
    "InternVLChatModel": Family.INTERNVL,
    "InternVLForConditionalGeneration": Family.INTERNVL,
    "Qwen3VLForConditionalGeneration": Family.QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": Family.QWEN3_VL_MOE,
}
MODEL_TYPES = {
    "internvl_chat": Family.INTERNVL,
    "internvl": Family.INTERNVL,
    "qwen3_vl": Family.QWEN3_VL,
    "qwen3_vl_moe": Family.QWEN3_VL_MOE,
}

SERVED = frozenset({Family.INTERNVL, Family.QWEN3_VL, Family.QWEN3_VL_MOE})
"""Families the vision and language servers serve in this version (Qwen3-VL-MoE: the dense
tower, vLLM's Qwen3-VL-MoE LLM with its fused-MoE kernels; see docs/qwen3vl.md)."""

NOT_SERVED_YET: dict[Family, str] = {}
"""Why a known family outside SERVED is refused (`require_servable`'s message): empty while
every known family is served; a family added to the table before its servers fill it."""


class UnsupportedFamily(ValueError):
    """The checkpoint's family is known but this version cannot serve it."""


def checkpoint_family(path: str | Path) -> Family:
    """The family of the checkpoint in `path`; ValueError naming the file and key if unknown."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: no such file (is {path} a checkpoint folder?)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: top level is not a JSON object")
    return family_of(raw, str(config_file))


def family_of(raw: dict[str, object], where: str = "config.json") -> Family:
    """The family a parsed config.json describes (see the module's table)."""
    architectures = raw.get("architectures")
    if isinstance(architectures, list) and architectures:
        family = ARCHITECTURES.get(str(architectures[0]))
        if family is None:
            raise ValueError(
                f"{where}: architecture {architectures[0]!r} is not one of {sorted(ARCHITECTURES)}"
            )
        return family
    model_type = raw.get("model_type")
    if model_type is None:
        raise ValueError(f"{where}: neither 'architectures' nor 'model_type' is set")
    family = MODEL_TYPES.get(str(model_type))
    if family is None:
        raise ValueError(f"{where}: model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    return family


def require_servable(path: str | Path, command: str) -> Family:
    """The checkpoint's family if `dvd <command>` can serve it; UnsupportedFamily (a
    ValueError, which the CLI turns into a one-line error and exit code 1) if not."""
    family = checkpoint_family(path)
    if family not in SERVED:
        raise UnsupportedFamily(
            f"{path} is a {family.display_name} checkpoint; dvd {command} serves only "
            f"{', '.join(sorted(f.display_name for f in SERVED))} checkpoints in this version. "
            f"{family.display_name} serving is not implemented yet: {NOT_SERVED_YET[family]}"
        )
    return family
