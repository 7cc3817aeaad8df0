"""The vLLM engine, fed with prompt embeddings (InternVL) or a prompt with vision rows
(Qwen3-VL, language_server/qwen3vl_engine.py).

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

from language_server.engine_args import PROMPT_EMBEDS_ARGS, EngineArgs, build_engine_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """What the engine starts with; language_server/engine_args.py turns it into vLLM's
    AsyncEngineArgs. A 0 or None leaves the setting to vLLM's default."""

    view: Path
    dtype: str
    max_model_len: int
    max_num_seqs: int
    kv_cache_bytes: int  # 0: vLLM sizes the KV cache from gpu_memory_utilization
    gpu_memory_utilization: float = 0.0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str = ""
    max_num_batched_tokens: int = 0
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = True
    seed: int = 0
    extra: EngineArgs = ()  # --engine-arg pairs, checked against vLLM's names
    view_args: EngineArgs = PROMPT_EMBEDS_ARGS  # what the view's inputs need (fixed)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # report each generated token's log-probability


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int = 0  # the prompt's length in tokens (images expanded), when known
    logprobs: tuple[float, ...] = ()  # of token_ids, when Sampling.logprobs


class LlmEngine:
    def __init__(self, engine: Any) -> None:
        self._engine = engine

    @classmethod
    def start(cls, settings: EngineSettings) -> LlmEngine:
        from vllm.v1.engine.async_llm import AsyncLLM

        args = build_engine_args(settings)
        kv_cache = (
            f"KV cache {settings.kv_cache_bytes / 2**20:.0f} MiB"
            if settings.kv_cache_bytes
            else f"KV cache from gpu_memory_utilization {args.gpu_memory_utilization}"
        )
        log.info(
            "starting vLLM on %s (max_model_len %d, %s, tensor parallel %d, pipeline parallel "
            "%d%s)",
            settings.view,
            settings.max_model_len,
            kv_cache,
            settings.tensor_parallel_size,
            settings.pipeline_parallel_size,
            "".join(f", {k}={v!r}" for k, v in settings.extra),
        )
        return cls(AsyncLLM.from_engine_args(args))

    def shutdown(self) -> None:
        self._engine.shutdown()

    async def generate(
        self, request_id: str, prompt_embeds: torch.Tensor, sampling: Sampling
    ) -> AsyncIterator[TokenDelta]:
        async for delta in self.generate_prompt(
            request_id, {"prompt_embeds": prompt_embeds}, sampling
        ):
            yield delta

    async def generate_prompt(
        self, request_id: str, prompt: dict[str, Any], sampling: Sampling
    ) -> AsyncIterator[TokenDelta]:
        """Any prompt vLLM takes (a dict: prompt_embeds, or prompt_token_ids / prompt with
        multi_modal_data), generated with `sampling`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            ignore_eos=sampling.ignore_eos,
            logprobs=0 if sampling.logprobs else None,  # 0: the chosen token's only
            output_kind=RequestOutputKind.DELTA,
        )
        async for output in self._engine.generate(prompt, params, request_id=request_id):
            completion = output.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = tuple(
                float(step[token].logprob)
                for step, token in zip(completion.logprobs or (), token_ids, strict=False)
            )
            yield TokenDelta(
                completion.text,
                token_ids,
                completion.finish_reason if output.finished else None,
                prompt_tokens=len(output.prompt_token_ids or ()),
                logprobs=logprobs,
            )

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def healthy(self) -> bool:
        try:
            await self._engine.check_health()
        except Exception:
            return False
        return not self._engine.errored
