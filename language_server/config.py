"""Configuration of one language server process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dvd.discovery import parse_targets
from dvd.routing import VISION_ROUTINGS
from dvd.tls import TlsConfig
from dvd.transport import NAMES as TRANSPORTS
from dvd.vir_mode import NAMES as VIR_NAMES
from language_server.engine_args import EngineArgs, check_owned

MODES = ("dvd", "coupled")

DTYPES = ("bfloat16", "float16", "float32")

WAITING_PER_SEQ = 2
"""Default bound on waiting requests, per --max-num-seqs: one full batch waiting behind the
one running, and as many again encoding or in prefill."""


@dataclass(frozen=True)
class LanguageServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 50061
    mode: str = "dvd"
    vision: tuple[str, ...] = field(default=("127.0.0.1:50051",))
    vision_routing: str = "cache-affine"  # or "least-loaded"
    vision_resolve_s: float = 5.0  # how often DNS names in `vision` are resolved again
    dns_server: str = ""  # "": the system resolver
    served_model_name: str | None = None
    dtype: str = "bfloat16"
    max_model_len: int = 0  # 0: min(the model's max_position_embeddings, 32768)
    max_num_seqs: int = 64
    # The KV cache is sized one way: kv_cache_gib > 0 fixes its size (per GPU), or
    # kv_cache_gib 0 lets vLLM size it from gpu_memory_utilization (a fraction of each GPU's
    # memory for weights, activations and KV cache together). Setting both is an error.
    kv_cache_gib: float = 2.0
    gpu_memory_utilization: float = 0.0  # 0: not used (kv_cache_gib sizes the cache)
    tensor_parallel_size: int = 1  # GPUs the LLM's layers are split across
    pipeline_parallel_size: int = 1  # stages the LLM's layers are cut into
    quantization: str = ""  # "": vLLM reads it from the checkpoint's config, if any
    max_num_batched_tokens: int = 0  # 0: vLLM's default
    enable_prefix_caching: bool | None = None  # None: vLLM's default
    enforce_eager: bool = True  # False: CUDA graphs / torch.compile (slower start)
    engine_args: EngineArgs = ()  # any other vLLM engine argument, as (name, value) pairs
    max_images_per_request: int = 16
    # Requests admitted that have no token yet (encoding, queued in vLLM, in prefill); one
    # more is refused with RESOURCE_EXHAUSTED. None: WAITING_PER_SEQ x max_num_seqs; 0: none.
    max_waiting_requests: int | None = None
    vision_timeout_s: float = 120.0
    # Coupled mode only: where and how the in-process ViT runs.
    vision_device: str = "auto"
    max_batch_tiles: int = 32
    max_image_pixels: int = 40_000_000
    vir_mode: str = "auto"  # auto: the router on -Flash checkpoints, else always-1/4
    transport: str = "grpc"  # how feature bytes arrive in dvd mode: grpc, shm, rdma
    shm_arena_mib: int = 1024
    tcp_host: str = "127.0.0.1"  # the tcp transport's data listener
    tcp_port: int = 0  # 0: any free port
    tcp_advertise: str = ""  # host vision servers dial; "": tcp_host
    rdma_device: str = ""  # "": the first RDMA device
    rdma_buffer_mib: int = 1024
    rdma_gid_index: int = 0
    metrics_port: int = 0
    cache_dir: str = ""
    # One identity for its gRPC port, the tcp transport's data port, and its calls to
    # vision servers (dvd.tls).
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"language server: mode must be one of {MODES}, not {self.mode!r}")
        if self.mode == "dvd" and not self.vision:
            raise ValueError("language server: dvd mode needs at least one --vision address")
        if self.vir_mode not in ("auto", *VIR_NAMES):
            raise ValueError(f"language server: vir_mode must be auto or one of {VIR_NAMES}")
        if self.vision_routing not in VISION_ROUTINGS:
            raise ValueError(f"language server: vision_routing must be one of {VISION_ROUTINGS}")
        if self.mode == "dvd":
            try:
                parse_targets(self.vision)
            except ValueError as exc:
                raise ValueError(f"language server: vision: {exc}") from None
        if self.transport not in TRANSPORTS:
            raise ValueError(f"language server: transport must be one of {TRANSPORTS}")
        checks = {
            "shm_arena_mib": self.shm_arena_mib >= 1,
            "tcp_port": 0 <= self.tcp_port < 65536,
            # the immediate value carries a byte offset: 32 bits
            "rdma_buffer_mib": 1 <= self.rdma_buffer_mib <= 4096,
            "rdma_gid_index": self.rdma_gid_index >= 0,
            "port": 0 <= self.port < 65536,
            "metrics_port": 0 <= self.metrics_port < 65536,
            "max_model_len": self.max_model_len >= 0,
            "vision_resolve_s": self.vision_resolve_s > 0,
            "max_num_seqs": self.max_num_seqs >= 1,
            "kv_cache_gib": self.kv_cache_gib >= 0,
            "gpu_memory_utilization": 0 <= self.gpu_memory_utilization <= 1,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "pipeline_parallel_size": self.pipeline_parallel_size >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 0,
            "max_images_per_request": self.max_images_per_request >= 1,
            "max_waiting_requests": self.max_waiting_requests is None
            or self.max_waiting_requests >= 0,
            "vision_timeout_s": self.vision_timeout_s > 0,
            "max_batch_tiles": self.max_batch_tiles >= 1,
            "max_image_pixels": self.max_image_pixels >= 1,
        }
        if self.dtype not in DTYPES:
            raise ValueError(f"language server: dtype must be one of {DTYPES}, not {self.dtype!r}")
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"language server: invalid {name}={getattr(self, name)!r}")
        self._check_kv_cache_sizing()
        self.tls.check_listener("language server")
        try:
            check_owned(self.engine_args)
        except ValueError as exc:
            raise ValueError(f"language server: {exc}") from None

    def _check_kv_cache_sizing(self) -> None:
        if self.kv_cache_gib > 0 and self.gpu_memory_utilization > 0:
            raise ValueError(
                "language server: kv_cache_gib and gpu_memory_utilization both size the KV "
                "cache; set --kv-cache-gib 0 to let vLLM size it from "
                "--gpu-memory-utilization, or leave --gpu-memory-utilization at 0"
            )
        if self.kv_cache_gib == 0 and self.gpu_memory_utilization == 0:
            raise ValueError(
                "language server: kv_cache_gib is 0, so gpu_memory_utilization must be in "
                "(0, 1] (e.g. --gpu-memory-utilization 0.9) to size the KV cache"
            )

    @property
    def waiting_bound(self) -> int:
        """Most requests waiting for their first token; 0: no bound."""
        if self.max_waiting_requests is None:
            return WAITING_PER_SEQ * self.max_num_seqs
        return self.max_waiting_requests

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


DEFAULT_CONTEXT_CAP = 32768
"""The context length served when --max-model-len is 0 and the model allows more: vLLM's
KV cache is sized for it, and most chats are far shorter."""


def context_length(config: LanguageServerConfig, llm_config: Mapping[str, Any]) -> int:
    """--max-model-len, or the model's own limit capped at DEFAULT_CONTEXT_CAP when it is 0;
    ValueError when it exceeds the model's max_position_embeddings."""
    model_max = int(llm_config.get("max_position_embeddings", DEFAULT_CONTEXT_CAP))
    if config.max_model_len == 0:
        return min(model_max, DEFAULT_CONTEXT_CAP)
    if config.max_model_len > model_max:
        raise ValueError(
            f"--max-model-len {config.max_model_len} exceeds the model's "
            f"max_position_embeddings {model_max}"
        )
    return config.max_model_len
