"""Lets PyPI's torchvision import on CPU-only torch, in the vLLM baseline's processes only.

`dvd bench compare` puts this folder on PYTHONPATH of the vLLM server it starts, and only
when `import torchvision` fails there, so Python runs this file at start-up in that server
and in every process it spawns (vLLM inspects models in a subprocess and runs its engine in
another). PyPI's torchvision wheels are CUDA builds: their `_C` extension cannot load
against CPU torch, and `torchvision/_meta_registrations.py` then dies registering fake
kernels for `torchvision::nms` and `torchvision::qnms`, operators that `_C` would have
defined. Defining those two schemas first (no kernels) lets the import finish; the image
transforms vLLM's InternVL processors use are plain torch code and work, while calling
`torchvision.ops.nms` still fails, as it would without the extension.

The schemas are defined lazily, just before the first `import torchvision`, so processes
that never import it do not import torch for nothing. Another sitecustomize further down
sys.path (this one shadows it) is run afterwards.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list[Any] = []  # a torch.library.Library un-defines its ops when collected


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    """Defines the schemas when `torchvision` is first imported; finds nothing itself."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                library.define(schema)
            _libraries.append(library)
        return None


def _run_shadowed_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


sys.meta_path.insert(0, _DefineTorchvisionOps())
_run_shadowed_sitecustomize()
