"""The LanguageService gRPC servicer: Generate, Info, Health."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from dvd import vir_mode
from dvd.deadline import Deadline
from dvd.errors import DvdError, InvalidInput, trailing_metadata
from dvd.grpc_server import close_when_done
from dvd.v1 import common_pb2, language_pb2, language_pb2_grpc
from language_server.admission import Place, WaitingRoom
from language_server.chat_prompt import BuiltPrompt, ChatPromptBuilder
from language_server.engine import LlmEngine, Sampling
from language_server.image_features import EncodedImages, FeatureSource
from language_server.metrics import STAGES, LanguageMetrics
from language_server.video_prompt import encode_visual

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLimits:
    model_name: str
    max_model_len: int
    max_images_per_request: int
    mode: str


class LanguageService(language_pb2_grpc.LanguageServiceServicer):
    def __init__(
        self,
        limits: ServiceLimits,
        builder: ChatPromptBuilder,
        engine: LlmEngine,
        vision: FeatureSource,
        metrics: LanguageMetrics,
        waiting: WaitingRoom | None = None,
    ) -> None:
        self.limits = limits
        self.builder = builder
        self.engine = engine
        self.vision = vision
        self.metrics = metrics
        self.waiting = waiting or WaitingRoom(0, metrics.waiting, metrics.refused.labels("waiting"))
        self._ids = itertools.count()
        self.ready = True

    async def Generate(
        self, request: language_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[language_pb2.GenerateResponse]:
        """One request; ends early when its caller leaves or its deadline passes (gRPC
        cancels it), which aborts the LLM request and the encode still running."""
        work = self._serve(request, Deadline.of_context(context))
        close_when_done(context, work)  # whatever this handler is doing when the call ends
        try:
            async with aclosing(work) as messages:
                async for message in messages:
                    yield message
        except DvdError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata(exc))

    async def _serve(
        self, request: language_pb2.GenerateRequest, deadline: Deadline
    ) -> AsyncGenerator[language_pb2.GenerateResponse, None]:
        """A request's messages, with its accounting: it waits (counted against
        --max-waiting-requests) until its first token, and is counted and logged once,
        whichever way it ends."""
        started = time.monotonic()
        self.metrics.in_flight.inc()
        status = "ok"
        finished = False
        place: Place | None = None
        try:
            place = self.waiting.enter(request.request_id)
            async with aclosing(self._generate(request, deadline)) as messages:
                async for message in messages:
                    place.leave()  # tokens flow: it decodes, it no longer waits
                    finished = bool(message.finish_reason)
                    yield message
        except DvdError as exc:
            status = exc.code.name.lower()
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._expired(request.request_id, place, started)
            log.info("request %s failed: %s", request.request_id, exc.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # (a caller that has the last message may cancel before the stream's end: that
            # request finished)
            if not finished and deadline.expired():
                status = "deadline_exceeded"
                self._expired(request.request_id, place, started)
            elif not finished:
                status = "cancelled"
                log.info("request %s cancelled by the caller", request.request_id)
            raise
        finally:
            if place is not None:
                place.leave()
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(status).inc()

    def _expired(self, request_id: str, place: Place | None, started: float) -> None:
        stage = "waiting" if place is None or place.waiting else "decoding"
        self.metrics.expired.labels(stage).inc()
        log.info(
            "request %s: its deadline passed after %.1f s while %s; stopped (LLM request "
            "aborted, encode cancelled)",
            request_id,
            time.monotonic() - started,
            "waiting for its first token" if stage == "waiting" else "decoding",
        )

    async def _generate(
        self, request: language_pb2.GenerateRequest, deadline: Deadline
    ) -> AsyncGenerator[language_pb2.GenerateResponse, None]:
        started = time.monotonic_ns()
        # Images and videos in prompt order, as the family encodes them (video_prompt.py:
        # InternVL a video's frames as one-tile images, Qwen3-VL a video as one item).
        images = self.builder.visual_inputs(
            list(request.messages), self.limits.max_images_per_request
        )
        try:
            mode = vir_mode.from_wire(request.vir_mode)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        # Features are on their way while the text is templated and tokenised.
        encoding = (
            asyncio.create_task(
                encode_visual(
                    self.vision,
                    request.request_id,
                    images,
                    mode,
                    deadline,
                    per_call=self.limits.max_images_per_request,
                )
            )
            if images
            else None
        )
        try:
            t0 = time.monotonic_ns()
            rendered = self.builder.render(list(request.messages))
            render_ns = time.monotonic_ns() - t0
            encoded = await encoding if encoding is not None else EncodedImages(features=[])
            t1 = time.monotonic_ns()
            try:
                prompt = self.builder.assemble_images(rendered, encoded)
            finally:
                encoded.release()  # the features were copied into the prompt embeddings
            prompt_ns = render_ns + time.monotonic_ns() - t1
        finally:
            if encoding is not None:
                _settle(encoding)
        sampling = self._sampling(request.sampling, len(prompt.token_ids))
        async for message in self._decode(
            request.request_id, prompt, sampling, encoded, prompt_ns, started
        ):
            yield message

    def _sampling(self, options: language_pb2.SamplingOptions, prompt_len: int) -> Sampling:
        room = self.limits.max_model_len - prompt_len
        if room <= 0 or (options.max_tokens and options.max_tokens > room):
            asked = options.max_tokens or 1
            raise InvalidInput(
                f"This model's maximum context length is {self.limits.max_model_len} tokens. "
                f"The request has {prompt_len} prompt tokens (image tokens included) and asks "
                f"for {asked} completion tokens."
            )
        if options.temperature < 0:
            raise InvalidInput("temperature must not be negative")
        if not 0 <= options.top_p <= 1:
            raise InvalidInput("top_p must be in (0, 1]")
        return Sampling(
            max_tokens=options.max_tokens or room,
            temperature=options.temperature,
            top_p=options.top_p or 1.0,
            seed=options.seed if options.has_seed else None,
            stop=tuple(options.stop),
            ignore_eos=options.ignore_eos,
        )

    async def _decode(
        self,
        request_id: str,
        prompt: BuiltPrompt,
        sampling: Sampling,
        encoded: EncodedImages,
        prompt_ns: int,
        started: int,
    ) -> AsyncIterator[language_pb2.GenerateResponse]:
        engine_id = f"{request_id}-{next(self._ids)}"
        submitted = time.monotonic_ns()
        first_token_ns = 0
        completion_tokens = 0
        finished = False
        try:
            async for delta in self.engine.generate_prompt(
                engine_id, prompt.engine_input(), sampling
            ):
                now = time.monotonic_ns()
                first_token_ns = first_token_ns or now
                completion_tokens += len(delta.token_ids)
                if delta.finish_reason is None:
                    yield language_pb2.GenerateResponse(text=delta.text, token_ids=delta.token_ids)
                    continue
                finished = True
                timings = language_pb2.StageTimings(
                    queue_ns=encoded.queue_ns,
                    preprocess_ns=encoded.preprocess_ns,
                    encode_ns=encoded.encode_ns,
                    transfer_ns=encoded.transfer_ns,
                    prompt_ns=prompt_ns,
                    prefill_ns=first_token_ns - submitted,
                    decode_ns=now - first_token_ns,
                    total_ns=now - started,
                    # Encode is asked for right as the request starts (see _generate).
                    vision_sent_unix_ns=_unix(started) if encoded.features else 0,
                    first_token_unix_ns=_unix(first_token_ns),
                    last_token_unix_ns=_unix(now),
                )
                usage = language_pb2.Usage(
                    prompt_tokens=len(prompt.token_ids),
                    image_tokens=prompt.image_tokens,
                    completion_tokens=completion_tokens,
                    video_tokens=prompt.video_tokens,
                )
                self._observe(timings, usage)
                log.info(
                    "request %s: %d prompt (%d image) + %d completion tokens, %s, "
                    "encode %.1f ms%s, prefill %.1f ms, total %.1f ms",
                    request_id,
                    usage.prompt_tokens,
                    usage.image_tokens,
                    completion_tokens,
                    delta.finish_reason,
                    timings.encode_ns / 1e6,
                    f" on vision server {encoded.server}" if encoded.server else "",
                    timings.prefill_ns / 1e6,
                    timings.total_ns / 1e6,
                )
                yield language_pb2.GenerateResponse(
                    text=delta.text,
                    token_ids=delta.token_ids,
                    finish_reason=_finish_reason(delta.finish_reason),
                    usage=usage,
                    timings=timings,
                )
        finally:
            if not finished:
                await self.engine.abort(engine_id)

    def _observe(self, timings: language_pb2.StageTimings, usage: language_pb2.Usage) -> None:
        for stage in STAGES:
            self.metrics.stage.labels(stage).observe(getattr(timings, f"{stage}_ns") / 1e9)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.image_tokens.inc(usage.image_tokens)
        self.metrics.completion_tokens.inc(usage.completion_tokens)

    async def Info(
        self, request: common_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> language_pb2.LanguageInfo:
        return language_pb2.LanguageInfo(
            model=self.limits.model_name,
            max_model_len=self.limits.max_model_len,
            mode=self.limits.mode,
            vision_addresses=self.vision.member_addresses(),
            max_images_per_request=self.limits.max_images_per_request,
            accepts_video=self.builder.accepts_video,
        )

    async def Health(
        self, request: common_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.HealthResponse:
        """SERVING means "can serve": the engine runs and, in dvd mode, at least one vision
        server answers. Vision servers that do not answer are named in `detail` either way:
        one lost replica degrades the pool, it does not take this server out of service."""
        problems = [] if self.ready else ["draining"]
        if not await self.engine.healthy():
            problems.append("LLM engine is not healthy")
        vision = await self.vision.healthy()
        lost = [f"vision server {address} is not serving" for address, ok in vision if not ok]
        if self.limits.mode == "dvd" and not any(ok for _, ok in vision):
            problems.append("no vision server is serving")
        if problems:
            return common_pb2.HealthResponse(
                status=common_pb2.HealthResponse.STATUS_NOT_SERVING,
                detail="; ".join(problems + lost),
            )
        return common_pb2.HealthResponse(
            status=common_pb2.HealthResponse.STATUS_SERVING, detail="; ".join(lost)
        )


def _finish_reason(reason: str) -> str:
    """vLLM says "stop" for EOS and stop strings, "length" for max_tokens; "abort" otherwise."""
    return reason if reason in ("stop", "length") else "stop"


def _settle(encoding: asyncio.Task[EncodedImages]) -> None:
    """Stops an encode still running, and frees the transport memory of one that finished
    (release is idempotent, so this is safe after the prompt was assembled)."""
    if not encoding.done():
        encoding.cancel()
    elif not encoding.cancelled() and encoding.exception() is None:
        encoding.result().release()


def _unix(monotonic_ns: int) -> int:
    """A time.monotonic_ns() instant on the wall clock, for timings clients line up."""
    return monotonic_ns + time.time_ns() - time.monotonic_ns()
