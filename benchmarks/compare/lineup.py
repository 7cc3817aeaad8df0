"""The systems `dvd bench compare` runs, and the command line that starts each one.

InternVL presets (`small`, ...):

| name | what | checkpoint |
| --- | --- | --- |
| vllm | vLLM's OpenAI server, -HF layout served natively (ViT in the engine) | small, -HF |
| coupled | `dvd up --coupled`: the ViT inside dvd's language server, no transfer | small |
| dvd-grpc | `dvd up --transport grpc`: vision and language servers, gRPC stream | small |
| dvd-<fast> | `dvd up --transport <fast>`: the fastest one-host transport (shm, else tcp) | small |
| dvd-vir | `dvd up --transport <fast>`, -Flash preset, vir_mode router per request | small-flash |
| dvd-up | `dvd up` exactly as it comes: its own transport and CPU placement, never pinned | small |

"small" in both layouts comes from one seed, so vllm, coupled and the dvd systems serve the
same weights; dvd-vir serves another model (the -Flash preset adds the router and its
weights are drawn anew), so its figures are not the same model's.

Qwen3-VL presets (`qwen3vl-small`, ...): the same systems but dvd-vir, all on ONE checkpoint
(transformers' save_pretrained layout is what vLLM reads natively and what dvd reads; there
is no second layout). dvd-vir does not apply (`QWEN3VL_NO_VIR`); how the two preprocessors
compare is `QWEN3VL_RESIZE_NOTE`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.compare.config import Pinning, Sizing
from dvd.checkpoint.family import Family

FAST_TRANSPORTS = ("shm", "tcp")
"""One-host transports, fastest first: shm copies once into memory the LLM reads; tcp
copies through the kernel. The first one usable here is the "fast" dvd system's."""
CHECKPOINTS = ("original", "hf", "vir")
"""Checkpoint roles: InternVL's original layout, the -HF layout (InternVL's, or Qwen3-VL's one
layout), the -Flash preset's original layout."""
QWEN3VL_NO_VIR = (
    "dvd-vir does not apply to Qwen3-VL: ViR (the Visual Resolution Router) compresses "
    "InternVL3.5-Flash's 448-px tiles, and Qwen3-VL has neither tiles nor a -Flash variant; "
    "it was skipped"
)
QWEN3VL_RESIZE_NOTE = (
    "vLLM's Qwen3-VL preprocesses images with transformers' torchvision image processor "
    "(torch resize), dvd with the PIL one: images whose sides are multiples of 32 px "
    "within the pixel budgets (448x448 and 896x896, the greedy check's and the default "
    "traffic's) are not resized, so both see the same pixels; other sizes differ by about "
    "one grey level on a few values"
)


@dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    checkpoint: str
    """Which checkpoint it serves (a role in CHECKPOINTS): "original", "hf" (same weights)
    or "vir" (-Flash)."""
    stage_source: str
    """"dvd" (the gateway's stage histograms) or "vllm" (vLLM's request histograms)."""
    dvd_flags: tuple[str, ...] = ()
    extra_body: dict[str, Any] = field(default_factory=dict, hash=False)
    pinnable: bool = True
    """False for dvd-up: what it measures is `dvd up`'s own placement, so --pin leaves it be."""

    @property
    def coupled(self) -> bool:
        """Whether the ViT runs in the LLM's server (it then gets every CPU)."""
        return self.name in ("vllm", "coupled")


def transport_usable(name: str) -> bool:
    """Whether dvd's `name` transport can run on this machine (imports; /dev/shm for shm)."""
    from dvd.transport import receiver_class

    try:
        receiver_class(name)
    except Exception:  # each backend's import says why; any failure means not here
        return False
    return name != "shm" or os.access("/dev/shm", os.W_OK)


def fast_transport(candidates: tuple[str, ...] = FAST_TRANSPORTS) -> str | None:
    return next((name for name in candidates if transport_usable(name)), None)


def lineup(fast: str | None, family: Family = Family.INTERNVL) -> list[SystemSpec]:
    """Every system for `family`, in the order they run; without a fast transport, dvd-vir
    uses grpc. Qwen3-VL: one checkpoint ("hf") for all, no dvd-vir."""
    qwen3vl = family is Family.QWEN3_VL
    ours = "hf" if qwen3vl else "original"  # the checkpoint dvd's systems serve
    native = "Qwen3-VL served natively" if qwen3vl else "InternVL -HF served natively"
    specs = [
        SystemSpec("vllm", f"vLLM OpenAI server, {native} (ViT in the engine)", "hf", "vllm"),
        SystemSpec(
            "coupled",
            "dvd up --coupled (ViT inside the language server)",
            ours,
            "dvd",
            ("--coupled",),
        ),
        SystemSpec("dvd-grpc", "dvd up --transport grpc", ours, "dvd", ("--transport", "grpc")),
    ]
    if fast is not None:
        specs.append(
            SystemSpec(
                f"dvd-{fast}", f"dvd up --transport {fast}", ours, "dvd", ("--transport", fast)
            )
        )
    if not qwen3vl:
        specs.append(vir_spec(fast or "grpc"))
    specs.append(
        SystemSpec(
            "dvd-up",
            "dvd up with its defaults (transport, CPU placement and thread counts its own)",
            ours,
            "dvd",
            pinnable=False,
        )
    )
    return specs


def vir_spec(transport: str) -> SystemSpec:
    return SystemSpec(
        "dvd-vir",
        f"dvd up --transport {transport} on the -Flash preset, vir_mode router",
        "vir",
        "dvd",
        ("--transport", transport),
        {"vir_mode": "router"},
    )


def dvd_argv(
    spec: SystemSpec, model: Path, port: int, sizing: Sizing, pinning: Pinning
) -> list[str]:
    """`dvd up` for `spec`, sized like every other system and pinned per `pinning`."""
    from benchmarks.systems import dvd_up_argv

    flags = [
        "--dtype",
        sizing.dtype,
        "--max-model-len",
        str(sizing.max_model_len),
        "--kv-cache-gib",
        f"{sizing.kv_cache_gib:g}",
        "--log-level",
        "warning",
    ]
    pinned = pinning.enabled and spec.pinnable
    if pinned and spec.coupled:
        flags += ["--language-cpus", pinning.coupled]
    elif pinned:
        flags += ["--vision-cpus", pinning.vision, "--language-cpus", pinning.language]
    return dvd_up_argv(model, port, *flags, *spec.dvd_flags)
