"""What the requests contain: seeded random words and noisy-gradient PNG images.

Everything is deterministic in the config's seed: request i gets the same prompt and the
same images in every run. Images are encoded before the run starts (so encoding costs no
time during it), `image_variants` distinct ones per size, and sent as
`data:image/png;base64,...` URLs; the noise keeps PNG from compressing them to nothing and
gives every tile different features. Every request's text differs (the warm-up's too), but
with one variant per size every request of a size carries the same image: a server that
caches encoder outputs or prefixes would skip that work, so give more variants to measure
such a server fairly.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from typing import Any

from benchmarks.serve.config import BenchConfig, ImageSize, format_image_size

# Common short English words: about one token each for Qwen-style BPE tokenizers.
_WORD_TEXT = (
    "the of and to in is that it for on was with as at by be this from or have not are "
    "but what all were when we there can an your which their if do will each about how up "
    "out them then she many some so these would other into has more her two like him see "
    "time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know get "
    "through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place "
    "well such here take why things help put years different away again off went old number "
    "picture image colour light small large city river tree house road sky left top"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class RequestSpec:
    """The contents of request `index`."""

    index: int
    prompt: str
    images: tuple[tuple[ImageSize, int], ...]
    """(size, variant) of each image."""

    @property
    def image_sizes(self) -> tuple[ImageSize, ...]:
        return tuple(size for size, _ in self.images)


class Workload:
    """Prompts and images for a run; encodes every image when constructed."""

    def __init__(self, config: BenchConfig) -> None:
        self._config = config
        sizes = dict.fromkeys(config.image_sizes) if config.images_per_request else {}
        self._urls = {
            (size, variant): data_url(noisy_gradient_png(*size, seed=config.seed, variant=variant))
            for size in sizes
            for variant in range(config.image_variants)
        }

    def request(self, index: int, *, warmup: bool = False) -> RequestSpec:
        """Request `index` of the run, or of the warm-up (other words, same images)."""
        config = self._config
        rng = random.Random(
            f"dvd-bench-serve/{'warmup' if warmup else 'run'}/{config.seed}/{index}"
        )
        prompt = prompt_words(config.prompt_tokens, rng)
        buckets, variants = config.image_sizes, config.image_variants
        images = []
        for slot in range(config.images_per_request):
            position = index * config.images_per_request + slot
            if config.image_order == "cycle":
                size = buckets[position % len(buckets)]
                variant = position // len(buckets) % variants
            else:
                size, variant = rng.choice(buckets), rng.randrange(variants)
            images.append((size, variant))
        return RequestSpec(index, prompt, tuple(images))

    def messages(self, spec: RequestSpec) -> list[dict[str, Any]]:
        """OpenAI chat messages: one user turn, the images first, then the text."""
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": self._urls[image]}} for image in spec.images
        ]
        parts.append({"type": "text", "text": spec.prompt})
        return [{"role": "user", "content": parts}]


def prompt_words(count: int, rng: random.Random) -> str:
    """`count` words drawn from WORDS, ending with a question mark."""
    return " ".join(rng.choice(WORDS) for _ in range(count)) + "?"


def noisy_gradient_png(width: int, height: int, seed: int = 0, variant: int = 0) -> bytes:
    """A PNG of RGB gradients plus noise, the same for the same (size, seed, variant)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, width, height, variant])
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack(
        [
            x * 255 // max(width - 1, 1),
            y * 255 // max(height - 1, 1),
            (x + y) * 255 // max(width + height - 2, 1),
        ],
        axis=-1,
    )
    noise = rng.integers(0, 48, size=(height, width, 3))
    pixels = np.clip(gradient + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def describe_sizes(sizes: tuple[ImageSize, ...]) -> tuple[str, ...]:
    return tuple(format_image_size(size) for size in sizes)
