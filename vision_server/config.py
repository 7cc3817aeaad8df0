"""Configuration of one vision server process."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dvd.tls import TlsConfig
from dvd.transport import parse_names as parse_transports
from dvd.vir_mode import NAMES as VIR_NAMES
from vision_server.batch_sizer import DEFAULT_MAX_BATCH_MS

DTYPES = ("bfloat16", "float16", "float32")

QUEUED_BATCHES = 8
"""Default bound on queued tiles, in ViT batches: a tile waits at most this many batch
times, and the pixels held stay bounded (about 2.4 MB per tile in float32)."""

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
"""Devices the ViT runs on: auto (CUDA when present, else CPU), cpu, cuda, cuda:N."""


@dataclass(frozen=True)
class VisionServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    dtype: str = "bfloat16"
    max_batch_tiles: int = 32
    max_wait_ms: float = 5.0
    max_batch_ms: float = DEFAULT_MAX_BATCH_MS  # 0: batches always fill to the maximum
    max_queued_tiles: int | None = None  # None: QUEUED_BATCHES x max_batch_tiles; 0: no bound
    max_images_per_request: int = 16
    max_image_pixels: int = 40_000_000
    max_tiles: int = 0  # 0: the checkpoint's max_dynamic_patch
    metrics_port: int = 0  # 0: no metrics endpoint
    transport: str = "grpc,shm"  # transports this server accepts, comma-separated
    rdma_device: str = ""  # "": the first RDMA device
    rdma_gid_index: int = 0
    encoder_cache_mib: int = 512  # 0 disables the cache of encoded images
    vir_mode: str = "auto"  # auto: the router on -Flash checkpoints, else always-1/4
    max_batch_patches: int = 16384  # Qwen3-VL: most patches in one forward
    min_pixels: int = 0  # Qwen3-VL: image pixel budgets; 0: the processor config's
    max_pixels: int = 0
    # Its gRPC port's TLS, and the client side of the tcp transport's data connections.
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port < 65536,
            "metrics_port": 0 <= self.metrics_port < 65536,
            "max_batch_tiles": self.max_batch_tiles >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "max_batch_ms": self.max_batch_ms >= 0,
            "max_queued_tiles": self.max_queued_tiles is None or self.max_queued_tiles >= 0,
            "max_images_per_request": self.max_images_per_request >= 1,
            "max_image_pixels": self.max_image_pixels >= 1,
            "max_tiles": self.max_tiles >= 0,
            "encoder_cache_mib": self.encoder_cache_mib >= 0,
            "max_batch_patches": self.max_batch_patches >= 1,
            "min_pixels": self.min_pixels >= 0,
            "max_pixels": self.max_pixels >= 0,
        }
        if self.dtype not in DTYPES:
            raise ValueError(f"vision server: dtype must be one of {DTYPES}, not {self.dtype!r}")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(
                f"vision server: device must be auto, cpu, cuda or cuda:N, not {self.device!r}"
            )
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"vision server: invalid {name}={getattr(self, name)!r}")
        if self.vir_mode not in ("auto", *VIR_NAMES):
            raise ValueError(f"vision server: vir_mode must be auto or one of {VIR_NAMES}")
        parse_transports(self.transport)  # ValueError naming the unknown one
        self.tls.check_listener("vision server")

    @property
    def queued_tiles_bound(self) -> int:
        """Most tiles waiting for the ViT before calls are refused; 0: no bound."""
        if self.max_queued_tiles is None:
            return QUEUED_BATCHES * self.max_batch_tiles
        return self.max_queued_tiles

    @property
    def queued_patches_bound(self) -> int:
        """Qwen3-VL: most patches waiting for the ViT before calls are refused; 0: no bound
        (--max-queued-tiles 0 turns it off; otherwise QUEUED_BATCHES forwards' patches: a
        positive --max-queued-tiles counts InternVL tiles and is not used, which the
        Qwen3-VL server logs at start)."""
        if self.max_queued_tiles == 0:
            return 0
        return QUEUED_BATCHES * self.max_batch_patches

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
