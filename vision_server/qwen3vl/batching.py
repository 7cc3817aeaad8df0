"""Groups items (images, videos; any requests) into ViT forwards by total patches.

Qwen3-VL items have variable length (t x h x w patches), so a batch is a packed sequence:
the items' patches concatenated, attention kept within each item's frames by the tower.
Items keep their order (first come, first encoded); a batch takes the next items while
their patches fit in `max_batch_patches`, and an item larger than the bound runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(patch_counts: Sequence[int], max_batch_patches: int) -> list[list[int]]:
    """Indices of `patch_counts`, in order, cut into runs of at most `max_batch_patches`
    patches (a single item over the bound is a run of its own)."""
    if max_batch_patches < 1:
        raise ValueError(f"max_batch_patches must be at least 1, got {max_batch_patches}")
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, count in enumerate(patch_counts):
        if count < 1:
            raise ValueError(f"item {index} has {count} patches")
        if current and total + count > max_batch_patches:
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += count
    if current:
        batches.append(current)
    return batches
