"""Writes a random-weight checkpoint with the file layout of a real InternVL3.5 release."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dvd.checkpoint import config_files
from dvd.checkpoint.config import HF, ORIGINAL
from dvd.checkpoint.hf_writer import save_with_transformers
from dvd.checkpoint.presets import get_preset
from dvd.checkpoint.random_weights import random_state_dict, to_hf
from dvd.checkpoint.tokenizer import REGULAR_VOCAB, write_tokenizer_files

WEIGHTS_FILE = "model.safetensors"


def make_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    layout: str = "original",
    seed: int = 0,
    *,
    force: bool = False,
) -> Path:
    """Writes a checkpoint of random weights to `out` and returns its path.

    The same (preset, seed) gives the same model in both layouts. An existing non-empty
    `out` is replaced only with force=True, and only if it holds a config.json (so a typo
    cannot delete an unrelated folder). The files are written to a temporary sibling and
    renamed into place, so a reader never sees half a checkpoint.
    """
    import torch
    from safetensors.torch import save_file

    if layout not in (ORIGINAL, HF):
        raise ValueError(f"layout {layout!r} is not {ORIGINAL}|{HF}")
    spec = get_preset(preset)
    if layout == HF and spec.flash_thresholds is not None:
        raise ValueError(
            f"preset {preset!r} has ViR, and -Flash models have no -HF layout in transformers"
        )
    target = Path(out)
    _check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        ids = write_tokenizer_files(work, layout, spec.llm_max_position_embeddings)
        # Only the regular vocabulary and EOS can be generated; the rule does not depend on
        # the layout, so both layouts hold the same model (-HF's extra <video> is muted).
        vocab = ids.padded_vocab()
        # With a tied head, muting zeroes embedding rows: keep those of the prompt markup.
        in_prompts = (
            {ids.img_start, ids.img_end, ids.im_start} if spec.tie_word_embeddings else set()
        )
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
            _write_json(
                work / "preprocessor_config.json", config_files.hf_preprocessor_config(spec)
            )
            _write_json(work / "processor_config.json", config_files.hf_processor_config(spec))
        os.chmod(work, 0o755)  # mkdtemp makes it 0700
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


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
