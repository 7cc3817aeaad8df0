"""The tile batcher packs tiles from concurrent requests and returns each its own features."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from vision_server.batcher import EncodedTiles, TileBatcher, TileRun
from vision_server.tile_features import TileFeatures


def fake_vit(pixels: torch.Tensor, with_vir: bool = False) -> TileFeatures:
    """A real (tiny) computation standing in for the ViT: 2 'tokens' per tile."""
    means = pixels.mean(dim=(1, 2, 3))
    quarter = torch.stack([means, means * 2], dim=1).unsqueeze(-1)
    if not with_vir:
        return TileFeatures(quarter)
    return TileFeatures(quarter, quarter[:, :1], means.sigmoid())


def make_run(request: str, tiles: int, sink: asyncio.Queue, value: float) -> TileRun:
    pixels = torch.full((tiles, 3, 4, 4), value)
    pixels += torch.arange(tiles, dtype=torch.float32).view(-1, 1, 1, 1)
    return TileRun(request, 0, 0, pixels, sink)


async def drain(sink: asyncio.Queue, tiles: int) -> list[EncodedTiles]:
    results: list[EncodedTiles] = []
    while sum(r.features.num_tiles for r in results) < tiles:
        item = await asyncio.wait_for(sink.get(), 10)
        assert not isinstance(item, BaseException)
        results.append(item)
    return results


def test_concurrent_requests_share_a_batch_and_get_their_own_features() -> None:
    async def scenario() -> None:
        batches: list[int] = []

        def vit(pixels: torch.Tensor, with_vir: bool) -> TileFeatures:
            batches.append(pixels.shape[0])
            return fake_vit(pixels, with_vir)

        batcher = TileBatcher(vit, max_batch_tiles=8, max_wait_ms=50)
        batcher.start()
        a, b = asyncio.Queue(), asyncio.Queue()
        batcher.submit(make_run("a", 3, a, 10.0))
        batcher.submit(make_run("b", 2, b, 100.0))
        got_a, got_b = await drain(a, 3), await drain(b, 2)
        await batcher.stop()
        assert batches == [5]
        expected_a = fake_vit(make_run("a", 3, a, 10.0).pixel_values).quarter
        expected_b = fake_vit(make_run("b", 2, b, 100.0).pixel_values).quarter
        assert torch.equal(got_a[0].features.quarter, expected_a)
        assert torch.equal(got_b[0].features.quarter, expected_b)

    asyncio.run(scenario())


def test_a_run_larger_than_a_batch_is_split_in_order() -> None:
    async def scenario() -> None:
        batches: list[int] = []

        def vit(pixels: torch.Tensor, with_vir: bool) -> TileFeatures:
            batches.append(pixels.shape[0])
            return fake_vit(pixels, with_vir)

        batcher = TileBatcher(vit, max_batch_tiles=4, max_wait_ms=0)
        batcher.start()
        sink: asyncio.Queue = asyncio.Queue()
        run = make_run("a", 10, sink, 1.0)
        batcher.submit(run)
        results = await drain(sink, 10)
        await batcher.stop()
        assert batches == [4, 4, 2]
        assert [r.first_tile for r in results] == [0, 4, 8]
        merged = TileFeatures.cat([r.features for r in results])
        assert torch.equal(merged.quarter, fake_vit(run.pixel_values).quarter)

    asyncio.run(scenario())


def test_cancelled_runs_are_skipped_and_errors_reach_every_request_in_the_batch() -> None:
    async def scenario() -> None:
        def broken(pixels: torch.Tensor, with_vir: bool) -> TileFeatures:
            raise RuntimeError("out of memory")

        batcher = TileBatcher(broken, max_batch_tiles=8, max_wait_ms=20)
        a, b, c = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
        skipped = make_run("c", 1, c, 0.0)
        skipped.cancellation.cancelled = True
        batcher.submit(make_run("a", 1, a, 0.0))
        batcher.submit(skipped)
        batcher.submit(make_run("b", 1, b, 0.0))
        batcher.start()
        for sink in (a, b):
            error = await asyncio.wait_for(sink.get(), 10)
            assert isinstance(error, RuntimeError)
        await batcher.stop()
        assert c.empty()

    asyncio.run(scenario())


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch_tiles"):
        TileBatcher(fake_vit, max_batch_tiles=0, max_wait_ms=1)
    with pytest.raises(ValueError, match="max_wait_ms"):
        TileBatcher(fake_vit, max_batch_tiles=1, max_wait_ms=-1)


def test_vir_is_computed_for_a_batch_when_any_run_asks_and_split_runs_share_cancellation() -> None:
    async def scenario() -> None:
        asked: list[bool] = []
        release = threading.Event()

        def vit(pixels: torch.Tensor, with_vir: bool) -> TileFeatures:
            asked.append(with_vir)
            release.wait(10)  # hold the first batch until the request is cancelled
            return fake_vit(pixels, with_vir)

        batcher = TileBatcher(vit, max_batch_tiles=3, max_wait_ms=20)
        a, b = asyncio.Queue(), asyncio.Queue()
        plain = make_run("a", 1, a, 1.0)
        routed = make_run("b", 5, b, 2.0)
        routed.with_vir = True
        batcher.submit(plain)
        batcher.submit(routed)
        batcher.start()
        while not asked:
            await asyncio.sleep(0.01)
        routed.cancellation.cancelled = True  # the split-off tail (3 tiles) must be skipped
        release.set()
        first = await asyncio.wait_for(b.get(), 10)
        assert first.features.compress_probability is not None
        assert (await asyncio.wait_for(a.get(), 10)).features.num_tiles == 1
        await asyncio.sleep(0.2)
        await batcher.stop()
        assert asked == [True]

    asyncio.run(scenario())


def test_batches_shrink_to_the_latency_target_once_the_time_per_tile_is_known() -> None:
    """The first two batches fill up to max_batch_tiles (the first, cold, is not counted;
    nothing is measured before the second); after them, a batch holds what fits 50 ms at
    the measured time per tile (this ViT takes 20 ms or more per tile), so the rest of the
    queue goes two tiles at a time, in order."""

    async def scenario() -> None:
        batches: list[int] = []

        def vit(pixels: torch.Tensor, with_vir: bool) -> TileFeatures:
            batches.append(pixels.shape[0])
            time.sleep(0.02 * pixels.shape[0])
            return fake_vit(pixels, with_vir)

        batcher = TileBatcher(vit, max_batch_tiles=8, max_wait_ms=0, max_batch_ms=50)
        batcher.start()
        sink: asyncio.Queue = asyncio.Queue()
        run = make_run("a", 24, sink, 1.0)
        batcher.submit(run)
        results = await drain(sink, 24)
        await batcher.stop()
        assert batches[:2] == [8, 8] and sum(batches) == 24
        assert all(1 <= size <= 2 for size in batches[2:])
        assert [r.first_tile for r in results] == sorted(r.first_tile for r in results)
        merged = TileFeatures.cat([r.features for r in results])
        assert torch.equal(merged.quarter, fake_vit(run.pixel_values).quarter)

    asyncio.run(scenario())


def test_batch_sizer_learns_the_time_per_unit() -> None:
    from vision_server.batch_sizer import BatchSizer

    sizer = BatchSizer(max_units=32, target_ms=250)
    assert sizer.capacity() == 32  # nothing measured yet
    sizer.observe(1, 5.0)  # the cold first batch is not counted
    assert sizer.capacity() == 32
    sizer.observe(8, 0.4)  # 50 ms per unit
    assert sizer.capacity() == 5
    sizer.observe(1, 0.01)  # a fast batch moves the average by SMOOTHING of the gap
    assert sizer.seconds_per_unit == pytest.approx(0.05 + 0.3 * (0.01 - 0.05))
    sizer.observe(0, 1.0)  # nothing encoded (all from the cache): no sample
    assert sizer.capacity() == int(0.25 / sizer.seconds_per_unit)
    slow = BatchSizer(max_units=32, target_ms=10)
    slow.observe(1, 1.0)  # cold
    slow.observe(1, 1.0)
    assert slow.capacity() == 1  # never below one unit
    fast = BatchSizer(max_units=32, target_ms=250)
    fast.observe(1, 1.0)  # cold
    fast.observe(32, 0.032)
    assert fast.capacity() == 32  # never above the maximum
    unbounded = BatchSizer(max_units=32, target_ms=0)
    unbounded.observe(1, 1.0)  # cold
    unbounded.observe(1, 10.0)
    assert unbounded.capacity() == 32
    with pytest.raises(ValueError, match="must not be negative"):
        BatchSizer(max_units=4, target_ms=-1)
