"""What dvd-serve hands vLLM's engine: its own settings, the flags, and `--engine-arg`.

dvd-serve fixes a few AsyncEngineArgs itself (the LLM-only view and its load format, and
what the view is fed: prompt embeddings for InternVL, multimodal embeddings with the tower
skipped for Qwen3-VL, `EngineSettings.view_args`), exposes the ones that serving 8B to
241B needs as flags of their own (`--tensor-parallel-size`, `--gpu-memory-utilization`,
...), and passes any other vLLM engine argument through `--engine-arg KEY=VALUE`. Names
are checked against vLLM's own before anything heavy starts, so a typo fails in seconds
with the names it was close to, instead of after the weights are loaded, and a key
dvd-serve owns is refused with the flag to use instead, so no setting has two sources that
could disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from language_server.engine import EngineSettings

EngineArgs = tuple[tuple[str, Any], ...]
"""Extra engine arguments as (name, value) pairs: a frozen config's field."""

OWNED = {
    "model": "it is the LLM-only view of --model that dvd-serve prepares",
    "tokenizer": "it is the LLM-only view of --model that dvd-serve prepares",
    "load_format": "dvd-serve's own load format reads only the LLM's weights",
    "enable_prompt_embeds": "dvd-serve feeds vLLM prompt embeddings",
    "enable_mm_embeds": "dvd-serve feeds vLLM the vision server's embeddings",
    "limit_mm_per_prompt": "the vision tower runs on the vision server, never in vLLM",
    "language_model_only": "the vision tower runs on the vision server, never in vLLM",
}
"""Engine arguments dvd-serve sets itself and no flag changes, with the reason."""

FLAGS = {
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs",
    "kv_cache_memory_bytes": "--kv-cache-gib",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "quantization": "--quantization",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "enable_prefix_caching": "--enable-prefix-caching/--no-enable-prefix-caching",
    "enforce_eager": "--enforce-eager/--no-enforce-eager",
}
"""Engine arguments that have a `dvd language` flag of their own."""


PROMPT_EMBEDS_ARGS: EngineArgs = (("enable_prompt_embeds", True),)
"""The engine arguments an InternVL view (a CausalLM fed prompt embeddings) needs."""


def normalize_key(key: str) -> str:
    """vLLM's command line spells names with dashes, its dataclass with underscores."""
    return key.strip().removeprefix("--").replace("-", "_")


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false/null, lists, objects), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_engine_args(items: Iterable[str]) -> EngineArgs:
    """`KEY=VALUE` items -> (name, value) pairs; a later item with the same name wins."""
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = normalize_key(key)
        if not sep or not name:
            raise ValueError(f"engine_arg {item!r} is not KEY=VALUE")
        pairs[name] = parse_value(value)
    return tuple(pairs.items())


def check_owned(args: EngineArgs) -> None:
    """Refuses the engine arguments dvd-serve sets itself, naming the flag to use."""
    for name, _ in args:
        if name in OWNED:
            raise ValueError(f"engine_arg {name}: dvd-serve sets it itself ({OWNED[name]})")
        if name in FLAGS:
            raise ValueError(f"engine_arg {name}: use {FLAGS[name]} instead")


def vllm_engine_arg_names() -> frozenset[str]:
    """The fields of vLLM's AsyncEngineArgs (imports vLLM's argument module, not the engine)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def check_names(args: EngineArgs, known: frozenset[str] | None = None) -> None:
    """Every name must be one of vLLM's engine arguments; an unknown one is an error that
    lists the closest known names."""
    if not args:
        return
    names = sorted(vllm_engine_arg_names() if known is None else known)
    for name, _ in args:
        if name in names:
            continue
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else "the closest names are "
            + (", ".join(difflib.get_close_matches(name, names, n=4, cutoff=0.3)) or "none")
        )
        raise ValueError(
            f"engine_arg {name!r} is not a vLLM engine argument; {hint} (all of them: "
            "`python -m vllm.entrypoints.openai.api_server --help`, dashes or underscores)"
        )


def engine_kwargs(settings: EngineSettings) -> dict[str, Any]:
    """The AsyncEngineArgs keywords for `settings`. Left out when unset (0 or None), a
    setting keeps vLLM's own default."""
    from language_server.llm_view import LOAD_FORMAT

    kwargs: dict[str, Any] = {
        "model": str(settings.view),
        "load_format": LOAD_FORMAT,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "enforce_eager": settings.enforce_eager,
        "seed": settings.seed,
        "disable_log_stats": True,
    }
    optional = {
        # A fixed KV cache size; without it vLLM sizes the cache from gpu_memory_utilization.
        "kv_cache_memory_bytes": settings.kv_cache_bytes or None,
        "gpu_memory_utilization": settings.gpu_memory_utilization or None,
        "quantization": settings.quantization or None,
        "max_num_batched_tokens": settings.max_num_batched_tokens or None,
        "enable_prefix_caching": settings.enable_prefix_caching,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    kwargs.update(settings.view_args)  # the inputs the view is fed (owned: not overridable)
    check_owned(settings.extra)
    kwargs.update(settings.extra)  # seed and disable_log_stats may be overridden
    return kwargs


def build_engine_args(settings: EngineSettings) -> Any:
    """vLLM's AsyncEngineArgs for `settings` (a dataclass: building it starts nothing)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    check_names(settings.extra)
    return AsyncEngineArgs(**engine_kwargs(settings))
