"""Writes a random-weight checkpoint with the file layout of a real release (InternVL3.5 in
both its layouts, or Qwen3-VL: `qwen3vl_writer.py`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvd.checkpoint import config_files
from dvd.checkpoint.config import HF, ORIGINAL
from dvd.checkpoint.hf_writer import save_with_transformers
from dvd.checkpoint.presets import Preset, get_preset
from dvd.checkpoint.qwen3vl_presets import QWEN3VL_PRESETS
from dvd.checkpoint.qwen3vl_writer import write_qwen3vl
from dvd.checkpoint.random_weights import random_state_dict, to_hf
from dvd.checkpoint.tokenizer import REGULAR_VOCAB, write_tokenizer_files

WEIGHTS_FILE = "model.safetensors"


def make_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    layout: str | None = None,
    seed: int = 0,
    *,
    force: bool = False,
) -> Path:
    """Writes a checkpoint of random weights to `out` and returns its path.

    InternVL presets (`presets.PRESETS`) come in two layouts, "original" (the default) and
    "hf"; the same (preset, seed) gives the same model in both. Qwen3-VL presets
    (`qwen3vl_presets.QWEN3VL_PRESETS`) have the one layout of their releases (layout None or
    "hf"). An existing non-empty `out` is replaced only with force=True, and only if it
    holds a config.json (so a typo cannot delete an unrelated folder). The files are written
    to a temporary sibling and renamed into place, so a reader never sees half a checkpoint.
    """
    if preset in QWEN3VL_PRESETS:
        if layout not in (None, HF):
            raise ValueError(f"preset {preset!r} is Qwen3-VL, whose releases have one layout (hf)")
        spec_q = QWEN3VL_PRESETS[preset]
        return _write_atomically(Path(out), force, lambda work: write_qwen3vl(work, spec_q, seed))
    layout = layout or ORIGINAL
    if layout not in (ORIGINAL, HF):
        raise ValueError(f"layout {layout!r} is not {ORIGINAL}|{HF}")
    spec = get_preset(preset)
    if layout == HF and spec.flash_thresholds is not None:
        raise ValueError(
            f"preset {preset!r} has ViR, and -Flash models have no -HF layout in transformers"
        )
    chosen = layout
    return _write_atomically(
        Path(out), force, lambda work: _write_internvl(work, spec, chosen, seed)
    )


def _write_atomically(target: Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Runs `write` on a fresh temporary sibling of `target`, then renames it into place."""
    _check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(work)
        os.chmod(work, 0o755)  # mkdtemp makes it 0700
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _write_internvl(work: Path, spec: Preset, layout: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    ids = write_tokenizer_files(work, layout, spec.llm_max_position_embeddings)
    # Only the regular vocabulary and EOS can be generated; the rule does not depend on
    # the layout, so both layouts hold the same model (-HF's extra <video> is muted).
    vocab = ids.padded_vocab()
    # With a tied head, muting zeroes embedding rows: keep those of the prompt markup.
    in_prompts = {ids.img_start, ids.img_end, ids.im_start} if spec.tie_word_embeddings else set()
    muted = [i for i in range(REGULAR_VOCAB, vocab) if i != ids.eos and i not in in_prompts]
    state = random_state_dict(spec, vocab, muted, seed)
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in sorted(state.items())}
    if layout == ORIGINAL:
        save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(work / "config.json", config_files.original_config(spec, ids))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = config_files.safetensors_index(list(tensors), total, WEIGHTS_FILE)
        _write_json(work / "model.safetensors.index.json", index)
        _write_json(work / "generation_config.json", config_files.original_generation_config())
    else:
        llm = config_files.llm_config(spec, ids)
        save_with_transformers(work, spec, ids, llm, to_hf(tensors, spec.vit_hidden))
        _write_json(work / "preprocessor_config.json", config_files.hf_preprocessor_config(spec))
        _write_json(work / "processor_config.json", config_files.hf_processor_config(spec))


def _check_target(target: Path, force: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    if not any(target.iterdir()):
        target.rmdir()
        return
    if not force:
        raise FileExistsError(f"{target} is not empty (use force=True / --force to replace it)")
    if not (target / "config.json").exists():
        raise ValueError(
            f"{target} has no config.json: not replacing a folder that is no checkpoint"
        )


def _write_json(file: Path, data: Any) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
