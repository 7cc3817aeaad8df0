"""The gateway's FastAPI app: routes, middleware, and the state its lifespan owns.

`create_app(config)` builds the app; its lifespan opens the metrics registry, the
language-server pool, (unless remote images are off) the guarded image fetcher and (when
other processes' metrics are appended) one for scraping them, and stores them on
`app.state`. Nothing lives in module globals. The API keys (gateway.auth) are on
`app.state.keys` from the start, since the middleware that checks them needs them.

/health is liveness (the process answers); /ready is readiness, "can serve": at least one
language server answers Health SERVING. A degraded member is listed in /ready's body, not
fatal, since the pool routes around it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from dvd import __version__
from gateway.admission import AdmissionMiddleware
from gateway.auth import ApiKeys, AuthMiddleware
from gateway.backends import BackendPool
from gateway.config import GatewayConfig
from gateway.drain import DrainMiddleware, DrainState
from gateway.errors import error_body, install_handlers
from gateway.media_guard import MediaFetcher
from gateway.metrics import GatewayMetrics
from gateway.middleware import (
    CHAT_PATH,
    AccessMiddleware,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
)
from gateway.protocol import ChatCompletion, ErrorResponse, ModelCard, ModelList
from gateway.scrape import fetch_all, merge
from gateway.serving import create_chat_completion, served_model
from gateway.videos import VideoLoader

logger = logging.getLogger("dvd.gateway")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)
}


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app for `config`; serve it with uvicorn (see gateway.cli.run)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.metrics = GatewayMetrics()
        app.state.pool = BackendPool.from_config(config, app.state.metrics, app.state.tls)
        app.state.media = MediaFetcher(config) if config.remote_images else None
        app.state.videos = VideoLoader(config, app.state.media, app.state.metrics)
        # Loopback URLs of this stack's own processes: no proxy from the environment.
        app.state.scraper = httpx.AsyncClient(trust_env=False) if config.scrape_metrics else None
        reload_on_sighup = _watch_sighup(app.state.keys)
        try:
            await app.state.pool.start()
            yield
        finally:
            if reload_on_sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await app.state.pool.close()
            for client in (app.state.media, app.state.scraper):
                if client is not None:
                    await client.aclose()

    app = FastAPI(title="dvd-serve gateway", version=__version__, lifespan=lifespan)
    app.state.config = config
    # Built here, not in the lifespan: the middleware needs it, and a bad key file should
    # stop the process before it listens.
    app.state.keys = ApiKeys(config.api_keys, config.api_key_file)
    # Likewise the TLS files: read and checked before the gateway listens.
    app.state.tls = config.tls.load()
    app.state.drain = DrainState(config.drain_timeout_s)
    install_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=config.max_request_bytes,
        read_timeout_s=config.body_read_timeout_s,
    )
    # Behind the key check (a caller without a key takes no place), before the body is read
    # (a queued request holds no body in memory; its read timeout starts once admitted).
    app.add_middleware(
        AdmissionMiddleware,
        paths=frozenset({CHAT_PATH}),
        max_concurrent=config.max_concurrent_requests,
        max_queued=config.max_queued_requests,
    )
    # Inside AccessMiddleware (a refusal is logged and counted), before the body is read.
    app.add_middleware(AuthMiddleware, keys=app.state.keys, protect_metrics=config.protect_metrics)
    app.add_middleware(DrainMiddleware, state=app.state.drain)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=config.max_header_bytes)
    app.add_middleware(AccessMiddleware)  # added last: outermost
    _add_routes(app)
    return app


def _watch_sighup(keys: ApiKeys) -> bool:
    """Re-reads the key file on SIGHUP. Signal handlers belong to the main thread's loop; a
    gateway run elsewhere (in a test's thread) just keeps its keys."""
    if not keys.key_file:
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keys.reload)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        logger.warning("api keys: SIGHUP will not reload %s here (%s)", keys.key_file, exc)
        return False
    return True


def _add_routes(app: FastAPI) -> None:
    @app.post(
        CHAT_PATH,
        response_model=ChatCompletion,
        responses=ERROR_RESPONSES,
        summary="OpenAI chat completion (JSON, or SSE when stream is true)",
    )
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(request)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models(request: Request) -> ModelList:
        state = request.app.state
        name, limits = await served_model(state.pool, state.config, None)
        return ModelList(data=[ModelCard(id=name, max_model_len=limits.max_model_len)])

    @app.get("/health", summary="Liveness: 200 while the process runs")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 when at least one language server is SERVING")
    async def ready(request: Request) -> JSONResponse:
        if request.app.state.drain.draining:
            refusal = error_body(503, "the gateway is shutting down", code="server_shutting_down")
            return JSONResponse({"ready": False, **refusal}, status_code=503)
        pool: BackendPool = request.app.state.pool
        results = await pool.health()
        serving = [h for h in results if h.serving and not h.draining]
        body: dict[str, Any] = {
            "ready": bool(serving),
            "serving": len(serving),
            "members": [asdict(h) for h in results],
        }
        if serving:
            return JSONResponse(body)
        failed = [f"{h.address} ({h.detail})" for h in results if not h.draining]
        message = "no language server is serving: " + ("; ".join(failed) or pool.none_found)
        body |= error_body(503, message, code="backend_unavailable")
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics (and those of --scrape-metrics URLs)")
    async def metrics(request: Request) -> Response:
        state = request.app.state
        registry: GatewayMetrics = state.metrics
        config: GatewayConfig = state.config
        if state.scraper is None:
            return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
        sources = await fetch_all(
            state.scraper, config.scrape_metrics, config.scrape_timeout_s, registry
        )
        # Rendered after fetching, so dvd_gateway_scrape_up describes this very scrape.
        return Response(merge(registry.render(), sources), media_type=CONTENT_TYPE_LATEST)
