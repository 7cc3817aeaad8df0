"""The vLLM engine, fed with prompt embeddings.

A thin wrapper over vLLM's AsyncLLM: it owns the engine's start-up arguments, turns our
sampling options into SamplingParams, and yields token deltas. The engine core runs in
its own process (AsyncLLM's design), so the LLM's steps never wait on this process's
event loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from language_server.llm_view import LOAD_FORMAT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    view: Path
    dtype: str
    max_model_len: int
    max_num_seqs: int
    kv_cache_bytes: int
    enforce_eager: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None


class LlmEngine:
    def __init__(self, engine: Any) -> None:
        self._engine = engine

    @classmethod
    def start(cls, settings: EngineSettings) -> LlmEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(settings.view),
            load_format=LOAD_FORMAT,
            dtype=settings.dtype,  # type: ignore[arg-type]  # checked by parse_dtype
            enforce_eager=settings.enforce_eager,
            enable_prompt_embeds=True,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            kv_cache_memory_bytes=settings.kv_cache_bytes,
            seed=settings.seed,
            disable_log_stats=True,
        )
        log.info(
            "starting vLLM on %s (max_model_len %d, KV cache %.0f MiB)",
            settings.view,
            settings.max_model_len,
            settings.kv_cache_bytes / 2**20,
        )
        return cls(AsyncLLM.from_engine_args(args))

    def shutdown(self) -> None:
        self._engine.shutdown()

    async def generate(
        self, request_id: str, prompt_embeds: torch.Tensor, sampling: Sampling
    ) -> AsyncIterator[TokenDelta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        async for output in self._engine.generate(
            {"prompt_embeds": prompt_embeds}, params, request_id=request_id
        ):
            completion = output.outputs[0]
            yield TokenDelta(
                completion.text,
                list(completion.token_ids),
                completion.finish_reason if output.finished else None,
            )

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def healthy(self) -> bool:
        try:
            await self._engine.check_health()
        except Exception:
            return False
        return not self._engine.errored
