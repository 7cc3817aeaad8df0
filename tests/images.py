"""Test images made on the fly (no files in the repo): the load generator's own images."""

from __future__ import annotations

from benchmarks.serve.workload import data_url
from benchmarks.serve.workload import noisy_gradient_png as png_bytes

__all__ = ["data_url", "png_bytes"]
