"""The checkpoints `dvd bench compare` serves: made once per run, one seed, by the code of
`dvd make-checkpoint`, and described for the report.

The preset decides the model family. InternVL presets are written in both layouts (the
original one for dvd, the -HF one for vLLM's own InternVL code) from one seed, plus a
-Flash preset for dvd-vir. A Qwen3-VL preset is written once: transformers' save_pretrained
layout of `Qwen3VLForConditionalGeneration` is the releases' layout, which vLLM serves
natively and dvd reads as it is, so every system serves the very same folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.checkpoint.family import Family
from dvd.checkpoint.presets import PRESETS
from dvd.checkpoint.qwen3vl_presets import QWEN3VL_PRESETS


def preset_family(preset: str) -> Family:
    """The family a `--preset` name makes; ValueError listing every known preset otherwise."""
    if preset in QWEN3VL_PRESETS:
        return Family.QWEN3_VL
    if preset in PRESETS:
        return Family.INTERNVL
    known = sorted(PRESETS) + sorted(QWEN3VL_PRESETS)
    raise ValueError(f"preset {preset!r} is not one of {known}")


@dataclass(frozen=True)
class CheckpointPlan:
    """What to make: the preset, the -Flash preset for dvd-vir, the seed, the roles needed."""

    preset: str
    vir_preset: str
    seed: int
    roles: frozenset[str]
    """Roles (`lineup.CHECKPOINTS`) the chosen systems serve; only those are made."""

    @property
    def family(self) -> Family:
        return preset_family(self.preset)

    def folder_names(self) -> dict[str, str]:
        """The folder of each role; served model names are these, so they name the model."""
        if self.family is Family.QWEN3_VL:
            return {"hf": f"{self.preset}-random"}
        base = f"internvl3_5-{self.preset}-random"
        names = {
            "original": base,
            "hf": f"{base}-hf",
            "vir": f"internvl3_5-{self.vir_preset}-random",
        }
        return {role: names[role] for role in sorted(self.roles)}


def make_checkpoints(plan: CheckpointPlan, work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Writes the plan's checkpoints under `work`; their paths by role, and the report's
    "checkpoint" entry (which folder each role is, and a sentence saying what they are)."""
    from dvd.checkpoint import make_checkpoint

    names = plan.folder_names()
    paths: dict[str, Path] = {}
    for role, name in names.items():
        preset = plan.vir_preset if role == "vir" else plan.preset
        layout = "hf" if role == "hf" else None
        paths[role] = make_checkpoint(work / name, preset=preset, layout=layout, seed=plan.seed)
    if plan.family is Family.QWEN3_VL:
        return paths, _qwen3vl_meta(plan, names["hf"])
    return paths, _internvl_meta(plan, names)


def _qwen3vl_meta(plan: CheckpointPlan, folder: str) -> dict[str, Any]:
    moe = QWEN3VL_PRESETS[plan.preset].is_moe
    model_class = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    return {
        "family": Family.QWEN3_VL.value,
        "preset": plan.preset,
        "seed": plan.seed,
        "layouts": {"hf": folder},
        "description": (
            f"Qwen3-VL, random weights, preset `{plan.preset}` (seed {plan.seed}), ONE "
            f"checkpoint `{folder}` written by transformers' {model_class} (save_pretrained, "
            "the releases' files and keys): vLLM serves it natively (its own Qwen3-VL, ViT in "
            "the engine) and every dvd system serves the same folder"
        ),
    }


def _internvl_meta(plan: CheckpointPlan, names: dict[str, str]) -> dict[str, Any]:
    description = (
        f"InternVL3.5, random weights, preset `{plan.preset}` (seed {plan.seed}) written once "
        "in both layouts: the original one for coupled and the dvd systems, the -HF one for "
        "vLLM (same weights)"
    )
    if "vir" in names:
        description += (
            f"; dvd-vir serves preset `{plan.vir_preset}` (same seed), a DIFFERENT model: its "
            "-Flash router and weights are its own, and it has no -HF layout"
        )
    meta: dict[str, Any] = {
        "family": Family.INTERNVL.value,
        "preset": plan.preset,
        "vir_preset": plan.vir_preset,
        "seed": plan.seed,
        "layouts": {role: names[role] for role in ("original", "hf") if role in names},
        "description": description,
    }
    if "vir" in names:
        meta["vir"] = names["vir"]
    return meta
