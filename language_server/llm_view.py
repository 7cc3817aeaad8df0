"""An LLM-only view of a VLM checkpoint, for vLLM.

vLLM is pointed at a small folder that holds the LLM's own config.json (the checkpoint's
`llm_config` / `text_config`), links to the tokenizer files, links to the checkpoint's
safetensors files, and `dvd_source.json` naming the checkpoint. vLLM loads it with the
`dvd_llm_only` load format (language_server/vllm_plugin.py), which reads only the LLM's
tensors from the original files in place: no converted copy is written, and no vision
weight is ever read by the LLM's process.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dvd.checkpoint import InternVLConfig

SOURCE_FILE = "dvd_source.json"
LOAD_FORMAT = "dvd_llm_only"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)


def _fingerprint(checkpoint: Path) -> str:
    config_file = checkpoint / "config.json"
    stat = config_file.stat()
    key = f"{checkpoint.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def view_folder(checkpoint: Path, cache_root: str | Path) -> Path:
    """The (created) view folder of `checkpoint`: one per checkpoint path and config.json."""
    view = Path(cache_root) / "llm-views" / f"{checkpoint.name}-{_fingerprint(checkpoint)}"
    view.mkdir(parents=True, exist_ok=True)
    return view


def link_checkpoint_files(checkpoint: Path, view: Path, names: tuple[str, ...] = ()) -> None:
    """Links the tokenizer files, `names` and every safetensors file into `view`."""
    for name in (*_TOKENIZER_FILES, *names):
        if (checkpoint / name).exists():
            _link(checkpoint / name, view / name)
    for weights in sorted(checkpoint.glob("*.safetensors")):
        _link(weights, view / weights.name)


def write_source(view: Path, checkpoint: Path, **more: str) -> None:
    """`dvd_source.json`, written last and atomically: a view with it is complete."""
    source = {"checkpoint": str(checkpoint.resolve()), **more}
    tmp = view / (SOURCE_FILE + f".{os.getpid()}")
    tmp.write_text(json.dumps(source))
    tmp.replace(view / SOURCE_FILE)


def prepare_llm_view(config: InternVLConfig, cache_root: str | Path) -> Path:
    """Creates (or refreshes) the view folder and returns its path."""
    view = view_folder(config.path, cache_root)
    llm_config = dict(config.llm_config)
    (view / "config.json").write_text(json.dumps(llm_config, indent=2))
    link_checkpoint_files(config.path, view)
    write_source(view, config.path, layout=config.layout)
    return view


def read_source(view: str | Path) -> Path:
    """The checkpoint folder a view was made from."""
    path = Path(view) / SOURCE_FILE
    try:
        return Path(json.loads(path.read_text())["checkpoint"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{view} is not a dvd LLM view ({path}: {exc})") from None
