"""`dvd gateway`: the OpenAI-compatible HTTP front door (FastAPI + uvicorn).

Every flag's default comes from `DVD_GATEWAY_<FLAG>` (see dvd.flags). Heavy imports (FastAPI,
uvicorn, gRPC) happen in `run`, so `dvd --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING, Any

from dvd.flags import add_flag, add_repeated_flag, add_tls_flags, tls_from_args
from dvd.routing import LEAST_LOADED
from gateway.config import ROUTINGS

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

COMMAND = "gateway"
MIB = 1024 * 1024


class _Addresses(argparse.Action):
    """--language: repeatable and comma-separated; the first use replaces the default."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from gateway.config import split_addresses

        current = getattr(namespace, self.dest)
        addresses = [] if current is self.default else list(current)
        addresses.extend(split_addresses(str(values)))
        setattr(namespace, self.dest, addresses)


def register(subparsers: Any) -> None:
    """Adds the `gateway` subcommand to the `dvd` CLI."""
    parser = subparsers.add_parser(
        COMMAND,
        help="serve the OpenAI-compatible HTTP API in front of language servers",
        description=(
            "Serves POST /v1/chat/completions (JSON or SSE), GET /v1/models, /health, /ready "
            "and /metrics, and forwards each chat request over gRPC to a language server: "
            "the one with the fewest requests in flight, or the one the conversation's "
            "leading messages hash to (--language-routing prefix-affine)."
        ),
    )
    flag = functools.partial(add_flag, parser, COMMAND)
    flag("--host", "127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    flag("--port", 8000, "HTTP port to listen on")
    flag(
        "--language",
        "127.0.0.1:50061",
        "language servers: host:port, [v6]:port or dns:///name:port, where a name (e.g. a "
        "headless Service) stands for every address it resolves to, one member each; repeat "
        "the flag or separate with commas for several",
        action=_Addresses,
        metavar="ADDR",
    )
    flag(
        "--language-resolve-s",
        5.0,
        "how often names in --language are re-resolved, in seconds (also at once when a "
        "member fails)",
    )
    flag(
        "--dns-server",
        "",
        "DNS server (ip:port) that resolves --language names; empty: the system resolver",
    )
    flag(
        "--language-routing",
        LEAST_LOADED,
        "which language server gets a request: least-loaded (fewest in flight), or "
        "prefix-affine (the one the conversation's first messages hash to, bounded by load, "
        "so a next turn finds its KV prefix cached)",
        choices=list(ROUTINGS),
    )
    flag(
        "--scrape-metrics",
        "",
        "other processes' /metrics URLs, comma-separated, whose series /metrics appends "
        "(labelled source=host:port); dvd up passes its vision and language servers'",
        metavar="URL[,URL...]",
    )
    flag(
        "--served-model-name",
        None,
        "model name clients must send; unset asks the language server's Info",
    )
    flag("--max-image-bytes", 20 * MIB, "largest encoded image accepted, in bytes")
    flag(
        "--max-image-pixels",
        40_000_000,
        "largest image accepted, in width*height pixels (read from the header, not decoded)",
    )
    flag("--max-images-per-request", 8, "most images accepted in one request")
    flag(
        "--video-fps",
        2.0,
        "video_url parts: frames sampled per second of video, evenly spread (first and last "
        "frame included); 0: no rate cap, --max-video-frames over the whole video (vLLM's "
        "default sampler)",
    )
    flag("--max-video-frames", 32, "most frames sampled from one video (vLLM's default: 32)")
    flag(
        "--max-video-bytes",
        64 * MIB,
        "largest video file accepted, in bytes (after base64 decoding or download)",
    )
    flag(
        "--max-video-duration-s",
        300.0,
        "longest video accepted, in seconds (it also bounds the frames decoded: 240 fps at "
        "this length)",
    )
    flag(
        "--max-video-pixels",
        1920 * 1080,
        "largest video frame accepted, in width*height pixels",
    )
    flag("--max-videos-per-request", 2, "most videos accepted in one request")
    flag(
        "--video-decode-timeout-s",
        60.0,
        "longest decoding one video may take, in seconds; longer is refused with 400",
    )
    flag(
        "--max-concurrent-video-decodes",
        2,
        "videos decoded at once (one CPU core each); more wait their turn",
    )
    flag(
        "--remote-video-timeout-s",
        30.0,
        "total time for one remote video: waiting for a fetch slot, DNS, redirects, body",
    )
    flag(
        "--max-request-bytes",
        64 * MIB,
        "largest HTTP request body, in bytes; larger bodies get 413 before parsing",
    )
    flag(
        "--max-concurrent-requests",
        128,
        "chat completions served at once; 0: no limit",
    )
    flag(
        "--max-queued-requests",
        256,
        "chat completions that may wait for a place; more get 429 with Retry-After",
    )
    flag(
        "--max-header-bytes",
        32 * 1024,
        "largest request head (all headers), in bytes; larger gets 431",
    )
    flag(
        "--body-read-timeout-s",
        30.0,
        "how long a request body may take to arrive; a slower sender gets 408",
    )
    flag(
        "--keep-alive-timeout-s",
        75.0,
        "how long idle client connections stay open (keep it above your load balancer's "
        "idle timeout, 60 s on most)",
    )
    flag(
        "--drain-timeout-s",
        30.0,
        "on SIGTERM: /ready and new requests answer 503 (Connection: close) while requests "
        "in flight get this long to finish",
    )
    flag(
        "--max-tokens-limit",
        0,
        "cap on max_tokens a client may ask for, also the default when it asks for none "
        "(0: no cap, generate up to the context limit)",
    )
    flag(
        "--request-timeout-s",
        600.0,
        "longest a chat completion may take, in seconds: the gRPC deadline through language "
        "and vision servers (504 when passed); a client's X-Request-Timeout, or the openai "
        "client's timeout on a non-streamed request, may make it shorter",
    )
    flag(
        "--remote-images",
        "on",
        "fetch http(s) image URLs (on, as vLLM does) or accept only data: URLs (off); fetches "
        "are refused for loopback, private, link-local, shared and metadata addresses",
        choices=["on", "off"],
    )
    # Before --remote-images existed, fetching was opt-in; the old switch still works.
    for old_flag, value in (("--allow-remote-images", "on"), ("--no-allow-remote-images", "off")):
        parser.add_argument(
            old_flag,
            dest="remote_images",
            action="store_const",
            const=value,
            help=argparse.SUPPRESS,
        )
    flag(
        "--allowed-media-domains",
        "",
        "comma-separated host names that image URLs and their redirects may name (exact "
        "match); empty: any host whose address passes the checks",
        metavar="HOST[,HOST...]",
    )
    flag(
        "--allow-private-media-addresses",
        False,
        "let image URLs reach loopback/private/link-local/shared addresses, for the host the "
        "client named or a host in --allowed-media-domains (a redirect elsewhere stays refused)",
    )
    flag("--max-image-redirects", 3, "most redirects followed for one remote image")
    flag(
        "--max-concurrent-image-fetches",
        16,
        "remote image fetches in progress at once; more wait (within their time limit)",
    )
    flag(
        "--remote-image-timeout-s",
        10.0,
        "total time for one remote image: waiting for a fetch slot, DNS, redirects, body",
    )
    add_repeated_flag(
        parser,
        COMMAND,
        "--api-key",
        "a key clients must send as 'Authorization: Bearer KEY' on /v1/*; repeat for several "
        "(with none here or in --api-key-file, the API is open)",
        metavar="KEY",
    )
    flag(
        "--api-key-file",
        "",
        "file of further API keys, one a line (# comments allowed), read again on SIGHUP",
    )
    flag(
        "--protect-metrics",
        False,
        "require an API key on /metrics too (/health and /ready always stay open)",
    )
    flag("--health-timeout-s", 2.0, "how long /ready waits for each language server's Health")
    add_tls_flags(parser, COMMAND, "language servers")
    flag(
        "--log-level",
        "info",
        "log level",
        choices=["critical", "error", "warning", "info", "debug"],
    )
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The GatewayConfig the parsed flags describe (ValueError names a bad field)."""
    from gateway.config import GatewayConfig, split_addresses

    language = args.language
    addresses = split_addresses(language) if isinstance(language, str) else list(language)
    return GatewayConfig(
        host=args.host,
        port=args.port,
        language_addresses=tuple(addresses),
        served_model_name=args.served_model_name or None,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_images_per_request=args.max_images_per_request,
        video_fps=args.video_fps,
        max_video_frames=args.max_video_frames,
        max_video_bytes=args.max_video_bytes,
        max_video_duration_s=args.max_video_duration_s,
        max_video_pixels=args.max_video_pixels,
        max_videos_per_request=args.max_videos_per_request,
        video_decode_timeout_s=args.video_decode_timeout_s,
        max_concurrent_video_decodes=args.max_concurrent_video_decodes,
        remote_video_timeout_s=args.remote_video_timeout_s,
        max_request_bytes=args.max_request_bytes,
        max_header_bytes=args.max_header_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_requests=args.max_queued_requests,
        body_read_timeout_s=args.body_read_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        max_tokens_limit=args.max_tokens_limit or None,
        request_timeout_s=args.request_timeout_s,
        remote_images=args.remote_images == "on",
        allowed_media_domains=tuple(split_addresses(args.allowed_media_domains)),
        allow_private_media_addresses=args.allow_private_media_addresses,
        remote_image_timeout_s=args.remote_image_timeout_s,
        max_image_redirects=args.max_image_redirects,
        max_concurrent_image_fetches=args.max_concurrent_image_fetches,
        health_timeout_s=args.health_timeout_s,
        api_keys=tuple(args.api_key),
        api_key_file=args.api_key_file,
        protect_metrics=args.protect_metrics,
        language_resolve_s=args.language_resolve_s,
        dns_server=args.dns_server,
        language_routing=args.language_routing,
        scrape_metrics=tuple(split_addresses(args.scrape_metrics)),
        tls=tls_from_args(args),
        log_level=args.log_level,
    )


def run(args: argparse.Namespace) -> int:
    """Builds the config from the flags and serves the gateway until interrupted."""
    import logging

    import uvicorn

    from gateway.app import create_app
    from gateway.drain import DrainingServer

    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"dvd gateway: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(config)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            access_log=False,  # AccessMiddleware logs one line per request
            timeout_keep_alive=round(config.keep_alive_timeout_s),
            # The drain (gateway/drain.py) has already let requests finish: this is the
            # last word for a connection that still hangs.
            timeout_graceful_shutdown=5,
        ),
        app.state.drain,
    )
    server.run()
    return 0
