"""Lazy access to a checkpoint's safetensors by name (InternVL in either layout, Qwen3-VL).

Only headers are read up front; a tensor is read (memory-mapped by safetensors) when asked
for, so a vision server never touches the LLM's weights and vice versa.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dvd.checkpoint import names
from dvd.checkpoint.config import HF, InternVLConfig
from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"


class CheckpointWeights:
    """The tensors of one checkpoint, read on demand."""

    def __init__(self, config: InternVLConfig | Qwen3VLConfig) -> None:
        self.config = config
        self._file_of = _index(config.path)
        self.files: list[Path] = sorted(set(self._file_of.values()))
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def names(self) -> list[str]:
        """Stored tensor names, sorted."""
        return sorted(self._file_of)

    def file_of(self, stored_name: str) -> Path:
        """The safetensors file that holds `stored_name`."""
        return self._file_of[stored_name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Stored name -> shape, from the files' headers alone (no tensor is read)."""
        if self._shapes is None:
            shapes: dict[str, tuple[int, ...]] = {}
            for file in self.files:
                shapes.update(_header_shapes(file))
            missing = sorted(set(self._file_of) - set(shapes))
            if missing:
                raise ValueError(
                    f"{self.config.path}: the index names tensors its files lack: {missing[:5]}"
                )
            self._shapes = {name: shapes[name] for name in self._file_of}
        return self._shapes

    def get(self, stored_name: str) -> torch.Tensor:
        """The tensor stored as `stored_name`, in its stored dtype."""
        from safetensors import safe_open

        file = self._file_of.get(stored_name)
        if file is None:
            raise KeyError(f"{self.config.path}: no weight named {stored_name!r}")
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(stored_name)

    def llm_weight_name(self, stored_name: str) -> str | None:
        """Plain-CausalLM name of a stored LLM weight; None for vision/projector weights."""
        return names.llm_weight_name(stored_name)

    def vision_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """vision_model.*, mlp1.* (and ViR's weights) in original-layout names, any layout.

        -HF q/k/v projections are concatenated back into attn.qkv (q, k, v order, as
        transformers' converter split them).
        """
        import torch

        if not isinstance(self.config, InternVLConfig):
            raise TypeError(f"{self.config.path}: vision_state_dict reads InternVL checkpoints")
        if self.config.layout != HF:
            out = {n: self.get(n) for n in self.names() if names.is_original_vision_name(n)}
        else:
            out = {}
            parts: dict[str, dict[str, torch.Tensor]] = {}
            for stored in self.names():
                if not names.is_hf_vision_name(stored):
                    continue
                original, part = names.hf_to_original_vision(stored)
                if part is None:
                    out[original] = self.get(stored)
                else:
                    parts.setdefault(original, {})[part] = self.get(stored)
            for original, qkv in parts.items():
                if sorted(qkv) != ["k", "q", "v"]:
                    raise ValueError(f"{self.config.path}: {original} lacks one of q/k/v")
                out[original] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
        if not out:
            raise ValueError(f"{self.config.path}: no vision weights found")
        if dtype is not None:
            out = {name: tensor.to(dtype) for name, tensor in out.items()}
        return dict(sorted(out.items()))

    def embed_tokens(self) -> torch.Tensor:
        """The LLM's input embedding table, (vocab_size, hidden_size)."""
        for stored in self.names():
            if names.llm_weight_name(stored) == "model.embed_tokens.weight":
                return self.get(stored)
        raise ValueError(f"{self.config.path}: no LLM embed_tokens weight found")


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header: an 8-byte little-endian length, then JSON."""
    with file.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if size <= 0 or size > 100 * 2**20:
            raise ValueError(f"{file}: not a safetensors file (header length {size})")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file}: unreadable safetensors header ({error})") from None
    return {
        name: tuple(int(d) for d in entry["shape"])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _index(folder: Path) -> dict[str, Path]:
    """Stored name -> file, from model.safetensors.index.json or the files' headers."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_file}: no valid 'weight_map' ({error})") from None
        file_of = {str(name): folder / str(file) for name, file in weight_map.items()}
        for file in set(file_of.values()):
            if not file.is_file():
                raise ValueError(f"{index_file}: names {file.name}, which does not exist")
        return file_of
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors file and no {INDEX_FILE}")
    file_of = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                file_of[name] = file
    return file_of
