"""How much work the next ViT batch takes: as much as fits a latency target.

A request's features reach the LLM only when its last batch is done, so a batch that mixes
many requests' tiles makes all of them wait for all of them. Where batching pays (a GPU,
whose time per tile falls as the batch grows) a large batch still fits the target; where
it does not (a CPU, about the same time per tile at any size) the target keeps batches
small, and the requests at the head of the queue finish first instead of everyone late.

The time per unit (tile or patch) is learnt from the batches run, as a moving average of
batch time / units; the first batch is not counted (it pays one-off costs: kernel
selection, allocator growth, a GPU's lazy start, ten times a later one's), and until the
second the cap is the configured maximum. Only the cap moves: the queue's bound and the
maximum batch stay as configured. Measured on 2 CPUs
(`dvd bench compare --systems vllm,dvd-up`, c=8, 448-896 px images): 32-tile batches gave
1.3 req/s, 4-tile (~270 ms) batches 1.6 req/s.
"""

from __future__ import annotations

DEFAULT_MAX_BATCH_MS = 250.0
"""The default target. On a CPU a tile costs about the same in any batch, so this keeps
batches to a few tiles (the small preset's: 3 at 67 ms each on one core, about 6 on two);
a GPU's batches stay at --max-batch-tiles. 100 ms (one tile) and 500 ms gave a later
median first token on 2 CPUs (README, "Time to first token under load")."""
SMOOTHING = 0.3
"""Weight of the newest batch in the moving average of seconds per unit."""


class BatchSizer:
    def __init__(self, max_units: int, target_ms: float) -> None:
        if max_units < 1:
            raise ValueError(f"max batch: must be at least 1, got {max_units}")
        if target_ms < 0:
            raise ValueError(f"max_batch_ms: must not be negative, got {target_ms}")
        self.max_units = max_units
        self.target_s = target_ms / 1000.0
        self.seconds_per_unit: float | None = None
        self._warm = False  # whether the first (cold) batch has been seen

    def capacity(self) -> int:
        """Units the next batch may hold: at least 1, at most max_units (0 ms: no target)."""
        if not self.target_s or not self.seconds_per_unit:
            return self.max_units
        return max(1, min(self.max_units, int(self.target_s / self.seconds_per_unit)))

    def observe(self, units: int, seconds: float) -> None:
        """A batch of `units` took `seconds`."""
        if units < 1 or seconds <= 0:
            return
        if not self._warm:
            self._warm = True
            return
        sample = seconds / units
        previous = self.seconds_per_unit
        self.seconds_per_unit = (
            sample if previous is None else previous + SMOOTHING * (sample - previous)
        )
