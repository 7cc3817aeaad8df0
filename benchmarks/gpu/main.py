"""`python -m benchmarks.gpu.main --out DIR`: the GPU measurements benchmarks/gpu.sh runs.

Sections, each written to DIR/report.json and DIR/summary.txt as soon as it is done (a run
killed by its time limit keeps what it measured):

1. environment: device, torch/CUDA versions;
2. matmul: the device's bf16 dense matmul rate (an 8192^3 GEMM), the ceiling for the ViT;
3. vit: tiles/s of vision_server.model.InternVLVision at InternViT-300M and -6B shapes for
   batches of 1..64 tiles, achieved TFLOP/s and their fraction of the matmul rate;
4. transfer: features from device memory to a second process through grpc and shm, beside
   device-to-host, memcpy and socket ceilings.

A section that fails is recorded with its error and the next one runs; so does a batch
that runs out of memory or of time (`--budget-s`). Exit status: 0 when everything was
measured, 1 when something failed or was skipped, 2 when there is no device to measure.
`--cpu-smoke` runs every section on the CPU with tiny shapes (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.shapes import BATCHES, SHAPES, SMOKE_BATCHES, TINY, VitShape


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
        }
    for module in ("grpc", "google.protobuf", "numpy", "transformers"):
        try:
            info[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # missing or broken: say which and why
            info[module] = f"unavailable ({type(exc).__name__}: {exc})"
    return info


def run_matmul(report: dict[str, Any], size: int, device: torch.device) -> None:
    from benchmarks.gpu.vit import matmul_tflops

    report["matmul"] = {"size": size, "tflops": matmul_tflops(device, torch.bfloat16, size)}


def run_vit(
    report: dict[str, Any],
    shapes: list[VitShape],
    batches: tuple[int, ...],
    args: argparse.Namespace,
    device: torch.device,
    budget: Budget,
    save: Callable[[], None],
) -> None:
    from benchmarks.gpu.vit import build_model, measure_batch

    dtype = torch.bfloat16
    matmul = report["matmul"].get("tflops")
    for shape in shapes:
        entry: dict[str, Any] = {
            "config": asdict(shape),
            "flops_per_tile": shape.flops_per_tile(),
            "batches": [],
        }
        report["vit"][shape.name] = entry
        try:
            started = time.perf_counter()
            model = build_model(shape, device, dtype)
            entry["build_s"] = time.perf_counter() - started
            entry["parameters"] = sum(p.numel() for p in model.parameters())
        except Exception as exc:  # e.g. out of memory: this shape is skipped, the next runs
            entry["error"] = f"building the model failed: {type(exc).__name__}: {exc}{_hint(exc)}"
            report["problems"].append(f"vit {shape.name}: {entry['error']}")
            save()
            continue
        for batch in batches:
            if budget.left_s < args.reserve_s:
                entry["batches"].append({"batch": batch, "skipped": "time budget spent"})
                report["problems"].append(f"vit {shape.name} batch {batch}: skipped (time budget)")
                continue
            try:
                rate = measure_batch(
                    model, shape, batch, device, dtype, matmul, args.repeats, args.min_time_s
                )
                entry["batches"].append(rate.to_json())
            except Exception as exc:  # out of memory, mostly: larger batches are not tried
                error = f"{type(exc).__name__}: {exc}"
                entry["batches"].append({"batch": batch, "error": error})
                report["problems"].append(f"vit {shape.name} batch {batch}: {error[:300]}")
                break
            save()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()


def run_transfer(
    report: dict[str, Any], args: argparse.Namespace, device: torch.device, save: Callable[[], None]
) -> None:
    if args.skip_transfer:
        report["transfer"] = {"skipped": args.skip_transfer}
        report["problems"].append(f"transfer: skipped ({args.skip_transfer})")
        return
    from benchmarks.gpu.transfer import ceilings, measure
    from benchmarks.transfer.cli import available_transports
    from benchmarks.transfer.shapes import Shape

    if args.cpu_smoke:
        shapes = [Shape(64, 1), Shape(64, 2)]
    else:
        shapes = [Shape(h, t) for h in (4096, 5120) for t in (1, 4, 13)]
    transports, notes = available_transports([t for t in args.transports.split(",") if t])
    sizes = sorted({s.bytes for s in shapes})
    section: dict[str, Any] = {"notes": notes, "transports": transports}
    report["transfer"] = section
    section["ceilings_gib_per_s"] = ceilings(device, sizes, args.repeats)
    save()
    section["results"] = measure(str(device), transports, shapes, args.repeats)
    for row in section["results"]:
        row["d2h_pageable_gib_per_s"] = section["ceilings_gib_per_s"]["d2h_pageable"][
            str(row["bytes"])
        ]
    report["problems"] += notes


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def _hint(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and "dvd.v1" in str(exc):
        return (
            " (vision_server imports dvd's gRPC stubs through dvd.vir_mode: generate them, "
            "or give benchmarks/gpu.sh --kit DIR)"
        )
    return ""


def summary(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    lines = [
        f"dvd GPU check on {env.get('gpu', env.get('device'))} (torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}), {report.get('elapsed_s', 0):.0f} s",
    ]
    matmul = report.get("matmul", {})
    if "tflops" in matmul:
        lines.append(f"bf16 matmul {matmul['size']}^3: {matmul['tflops']:.1f} TFLOP/s")
    for name, entry in report.get("vit", {}).items():
        lines.append(
            f"{name} ({entry.get('parameters', 0) / 1e6:.0f} M params, "
            f"{entry['flops_per_tile'] / 1e9:.0f} GFLOP/tile):"
        )
        if "error" in entry:
            lines.append(f"  {entry['error']}")
        for row in entry.get("batches", []):
            if "tiles_per_s" in row:
                fraction = row["fraction_of_matmul"]
                lines.append(
                    f"  batch {row['batch']:>3}: {row['tiles_per_s']:9.1f} tiles/s "
                    f"{row['ms_per_batch']:8.2f} ms  {row['tflops']:7.1f} TFLOP/s"
                    + (f" ({fraction:.0%} of matmul)" if fraction is not None else "")
                    + f"  features {row['feature_gib_per_s']:.2f} GiB/s"
                )
            else:
                lines.append(f"  batch {row['batch']:>3}: {row.get('error') or row.get('skipped')}")
    transfer = report.get("transfer", {})
    if "ceilings_gib_per_s" in transfer:
        for kind, by_size in transfer["ceilings_gib_per_s"].items():
            lines.append(
                f"ceiling {kind}: "
                + ", ".join(f"{_size(int(n))} {v:.2f} GiB/s" for n, v in by_size.items())
            )
    for row in transfer.get("results", []):
        lines.append(
            f"transfer {row['transport']:<5} hidden {row['hidden']:>5} x {row['tiles']:>2} tiles "
            f"({_size(row['bytes'])}): {row['gib_per_s']:6.2f} GiB/s, {row['ms']:7.2f} ms"
        )
    if "skipped" in transfer:
        lines.append(f"transfer: skipped ({transfer['skipped']})")
    for problem in report.get("problems", []):
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks.gpu.main",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder for report.json and summary.txt")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="stop starting work after this"
    )
    parser.add_argument(
        "--reserve-s", type=float, default=60.0, help="time kept for the transfer section"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (best is kept)")
    parser.add_argument("--min-time-s", type=float, default=0.5, help="least time timed per batch")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--shapes", default="internvit-300m,internvit-6b")
    parser.add_argument("--transports", default="grpc,shm")
    parser.add_argument("--skip-transfer", default="", help="skip the transfer section, saying why")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "problems": [],
        "matmul": {},
        "vit": {},
    }

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - started
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "summary.txt").write_text(summary(report))

    if args.cpu_smoke:
        device = torch.device("cpu")
        shapes, batches = list(TINY.values()), SMOKE_BATCHES
        args.matmul_size, args.repeats, args.min_time_s = 256, 2, 0.0
    else:
        if not torch.cuda.is_available():
            report["environment"] = environment(torch.device("cpu"))
            report["problems"].append(
                f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) "
                "sees none; use --cpu-smoke to check the script on a CPU"
            )
            save()
            print(summary(report), end="")
            return 2
        device = torch.device("cuda", 0)
        unknown = [n for n in args.shapes.split(",") if n not in SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: unknown {unknown}; have {sorted(SHAPES)}")
        shapes, batches = [SHAPES[n] for n in args.shapes.split(",")], BATCHES
    report["environment"] = environment(device)
    save()
    sections = (
        ("matmul", lambda: run_matmul(report, args.matmul_size, device)),
        ("vit", lambda: run_vit(report, shapes, batches, args, device, budget, save)),
        ("transfer", lambda: run_transfer(report, args, device, save)),
    )
    for name, section in sections:
        try:
            section()
        except Exception as exc:  # recorded; the next section still runs
            report["problems"].append(f"{name}: {type(exc).__name__}: {exc}{_hint(exc)}")
            report.setdefault("tracebacks", {})[name] = traceback.format_exc()
        save()
    print(summary(report), end="")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
