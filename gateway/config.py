"""The gateway's one frozen config, built by the CLI (or tests) and passed to `create_app`."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from dvd.discovery import parse_target
from dvd.routing import LEAST_LOADED
from dvd.tls import TlsConfig
from dvd.video import VideoLimits

MIB = 1024 * 1024

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
PREFIX_AFFINE = "prefix-affine"
ROUTINGS = (LEAST_LOADED, PREFIX_AFFINE)
"""How a call picks its language server: the least busy one, or the one the conversation's
leading messages hash to (bounded by load), where its KV prefix is likely cached."""


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, which language servers it calls, and the limits it enforces."""

    host: str = "127.0.0.1"
    port: int = 8000
    language_addresses: tuple[str, ...] = ("127.0.0.1:50061",)
    """Language servers that requests are spread over: `host:port`, `[v6]:port` or
    `dns:///name:port`; a name stands for every address it resolves to (one member each)."""
    language_resolve_s: float = 5.0
    """How often names in language_addresses are re-resolved (pods come and go)."""
    dns_server: str = ""
    """DNS server (ip:port) that resolves those names; empty: the system resolver."""
    language_routing: str = LEAST_LOADED
    """One of ROUTINGS."""
    scrape_metrics: tuple[str, ...] = ()
    """Other processes' /metrics URLs whose series the gateway's /metrics appends (`dvd up`
    passes its vision and language servers', so one scrape sees the whole stack)."""
    scrape_timeout_s: float = 1.0
    """How long /metrics waits for each of those; a late one is left out of that scrape."""
    served_model_name: str | None = None
    """Model name clients must ask for; None asks the language servers' Info."""
    max_image_bytes: int = 20 * MIB
    """Largest encoded image accepted (after base64 decoding or download)."""
    max_image_pixels: int = 40_000_000
    """Largest width * height accepted, read from the image header without decoding."""
    max_images_per_request: int = 8
    video_fps: float = 2.0
    """Frames sampled per second of video (dvd.video); 0: no rate cap, max_video_frames
    spread over the whole video (vLLM's default sampler)."""
    max_video_frames: int = 32
    """Most frames sampled from one video (vLLM's default num_frames)."""
    max_video_bytes: int = 64 * MIB
    """Largest video file accepted (after base64 decoding or download)."""
    max_video_duration_s: float = 300.0
    """Longest video accepted, in seconds (vLLM's max_duration)."""
    max_video_pixels: int = 1920 * 1080
    """Largest video frame accepted, in width * height pixels."""
    max_videos_per_request: int = 2
    video_decode_timeout_s: float = 60.0
    """Wall time for decoding one video; a video that takes longer is refused (400)."""
    max_concurrent_video_decodes: int = 2
    """Videos decoded at once across all requests (each takes a CPU core); more wait."""
    remote_video_timeout_s: float = 30.0
    """Total time for fetching one remote video (slot, DNS, redirects, body)."""
    max_request_bytes: int = 64 * MIB
    """Largest HTTP request body; larger bodies get 413 before any parsing."""
    max_tokens_limit: int | None = None
    """Cap on max_tokens a client may ask for (and the default when it asks for none)."""
    request_timeout_s: float = 600.0
    """Longest a chat completion may take: the Generate call's gRPC deadline, which the
    language server passes on to its vision calls. A client's own timeout may make it
    shorter (gateway.deadline)."""
    remote_images: bool = True
    """Whether http(s) image URLs are fetched (as vLLM does), under gateway.media_guard's
    rules; off, only data: URLs are accepted."""
    allowed_media_domains: tuple[str, ...] = ()
    """When set, the only hosts image URLs (and their redirects) may name."""
    allow_private_media_addresses: bool = False
    """Let image URLs reach loopback, private, link-local and shared addresses (for the host
    the client named or listed hosts only; metadata addresses never)."""
    remote_image_timeout_s: float = 10.0
    """Total time for one remote image: a fetch slot, DNS, every redirect and the body."""
    max_image_redirects: int = 3
    max_concurrent_image_fetches: int = 16
    """Remote image fetches in progress at once across all requests; more wait their turn."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Keys a client may present as `Authorization: Bearer <key>` on /v1/* (see gateway.auth);
    kept out of repr so that a logged config shows no key."""
    api_key_file: str = ""
    """File of further keys, one a line, read again on SIGHUP; empty: none."""
    protect_metrics: bool = False
    """Whether /metrics needs a key too (it shows traffic, not content)."""
    health_timeout_s: float = 2.0
    """How long /ready waits for each language server's Health answer."""
    max_concurrent_requests: int = 128
    """Chat completions served at once; 0: no limit (admission control off)."""
    max_queued_requests: int = 256
    """Chat completions that may wait for a place; beyond that 429 with Retry-After."""
    keep_alive_timeout_s: float = 75.0
    """How long an idle client connection stays open. Above the idle timeouts of common
    load balancers (60 s on AWS ALB and GCP), so the balancer, not the gateway, closes
    idle connections; the other way round it may reuse one the gateway just closed."""
    body_read_timeout_s: float = 30.0
    """How long a request body may take to arrive in full; a slower sender gets 408."""
    max_header_bytes: int = 32 * 1024
    """Largest request head (all header names and values); larger gets 431."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long requests in flight may take to finish (new ones get 503)."""
    tls: TlsConfig = field(default_factory=TlsConfig)
    """How the gateway calls language servers: TLS when a CA or a certificate is given, with
    this certificate as its client identity (mutual TLS); plaintext when none (dvd.tls).
    The HTTP API itself is plaintext: terminate client TLS at the load balancer/Ingress."""
    log_level: str = "info"

    def video_limits(self) -> VideoLimits:
        """How videos are sampled and checked (dvd.video)."""
        return VideoLimits(
            fps=self.video_fps,
            max_frames=self.max_video_frames,
            max_duration_s=self.max_video_duration_s,
            max_pixels=self.max_video_pixels,
            decode_timeout_s=self.video_decode_timeout_s,
        )

    def __post_init__(self) -> None:
        addresses = self.language_addresses
        if isinstance(addresses, str):
            addresses = split_addresses(addresses)
        object.__setattr__(self, "language_addresses", tuple(addresses))
        if not self.language_addresses:
            raise ValueError("language_addresses: at least one language server is needed")
        for address in self.language_addresses:
            try:
                parse_target(address)
            except ValueError as error:
                raise ValueError(f"language_addresses: {error}") from None
        if self.dns_server:
            try:
                dns_target = parse_target(self.dns_server)
            except ValueError as error:
                raise ValueError(f"dns_server: {error}") from None
            if not dns_target.is_address:
                raise ValueError(f"dns_server: {self.dns_server!r} is not an IP address and port")
        if self.language_routing not in ROUTINGS:
            raise ValueError(
                f"language_routing: {self.language_routing!r} is not one of {', '.join(ROUTINGS)}"
            )
        scrape = self.scrape_metrics
        if isinstance(scrape, str):
            scrape = split_addresses(scrape)
        object.__setattr__(self, "scrape_metrics", tuple(scrape))
        for url in self.scrape_metrics:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"scrape_metrics: {url!r} is not an http(s) URL")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not in 0..65535")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name: must not be empty (use None to ask Info)")
        domains = self.allowed_media_domains
        if isinstance(domains, str):
            domains = split_addresses(domains)
        object.__setattr__(self, "allowed_media_domains", tuple(domains))
        for host in self.allowed_media_domains:
            if not _is_host(host):
                raise ValueError(f"allowed_media_domains: {host!r} is not a host name")
        if not 0 <= self.video_fps <= 240:
            raise ValueError(f"video_fps: must be in 0..240 (0: no rate cap), got {self.video_fps}")
        for name in ("max_concurrent_requests", "max_queued_requests", "max_videos_per_request"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if self.max_image_redirects < 0:
            raise ValueError(
                f"max_image_redirects: must be at least 0, got {self.max_image_redirects}"
            )
        for name in (
            "max_concurrent_image_fetches",
            "max_image_bytes",
            "max_image_pixels",
            "max_images_per_request",
            "max_video_frames",
            "max_video_bytes",
            "max_video_pixels",
            "max_concurrent_video_decodes",
            "max_request_bytes",
            "max_header_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(
                f"max_tokens_limit: must be at least 1 or None, got {self.max_tokens_limit}"
            )
        for name in (
            "request_timeout_s",
            "remote_image_timeout_s",
            "remote_video_timeout_s",
            "max_video_duration_s",
            "video_decode_timeout_s",
            "health_timeout_s",
            "language_resolve_s",
            "scrape_timeout_s",
            "keep_alive_timeout_s",
            "body_read_timeout_s",
            "drain_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        for index, key in enumerate(self.api_keys):
            # The message names the key's position, never the key.
            if not key or key != key.strip() or any(c.isspace() for c in key):
                raise ValueError(f"api_keys: key {index + 1} is empty or holds whitespace")
        if self.api_key_file and not os.path.isfile(self.api_key_file):
            raise ValueError(f"api_key_file: {self.api_key_file!r} is not a readable file")
        if self.protect_metrics and not (self.api_keys or self.api_key_file):
            raise ValueError("protect_metrics: needs api_keys or api_key_file")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")


def _is_host(text: str) -> bool:
    """A host name or IP literal, without scheme, port, path or credentials."""
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return bool(text) and not any(c in text for c in "/:@?# ")


def split_addresses(text: str) -> list[str]:
    """`"a:1, b:2"` -> `["a:1", "b:2"]`."""
    return [part.strip() for part in text.split(",") if part.strip()]
