"""The encoder cache: bounded in bytes, LRU, content-keyed; repeats skip the ViT."""

from __future__ import annotations

import grpc
import pytest
import torch

from dvd.grpc_options import CHANNEL_OPTIONS
from dvd.v1 import vision_pb2, vision_pb2_grpc
from tests.images import png_bytes
from tests.stack import Stack
from vision_server.encoder_cache import CachedImage, EncoderCache, image_key
from vision_server.tile_features import TileFeatures
from vision_server.tiling import ImageLayout


def entry(tiles: int, with_vir: bool = False) -> CachedImage:
    quarter = torch.zeros(tiles, 256, 64, dtype=torch.bfloat16)  # 32 KiB a tile
    if with_vir:
        features = TileFeatures(quarter, torch.zeros(tiles, 64, 64), torch.zeros(tiles))
    else:
        features = TileFeatures(quarter)
    return CachedImage(ImageLayout(tiles, tiles, 1, 448 * tiles, 448), features)


def test_least_recently_used_images_are_evicted_to_stay_under_the_byte_bound() -> None:
    cache = EncoderCache(capacity_bytes=3 * 32 * 1024)
    for name in "abc":
        cache.put(name, entry(1))
    assert cache.get("a", with_vir=False) is not None  # a is now the most recent
    cache.put("d", entry(1))
    assert cache.get("b", with_vir=False) is None
    assert {k for k in "acd" if cache.get(k, with_vir=False)} == set("acd")
    assert cache.bytes == 3 * 32 * 1024
    cache.put("huge", entry(4))  # bigger than the whole cache: not stored, nothing evicted
    assert cache.get("huge", with_vir=False) is None and len(cache) == 3


def test_an_entry_without_vir_outputs_does_not_serve_a_router_request() -> None:
    cache = EncoderCache(capacity_bytes=10**7)
    cache.put("x", entry(2))
    assert cache.get("x", with_vir=True) is None
    cache.put("x", entry(2, with_vir=True))
    assert cache.get("x", with_vir=True) is not None and cache.get("x", with_vir=False)


def test_keys_follow_the_content_and_the_tile_limit() -> None:
    image = png_bytes(64, 64)
    assert image_key(image, 12) == image_key(bytes(image), 12)
    assert image_key(image, 12) != image_key(image, 6)
    assert image_key(image, 12) != image_key(png_bytes(64, 64, seed=1), 12)


@pytest.mark.integration
def test_a_repeated_image_skips_the_vit_and_sends_the_same_bytes(dvd_stack: Stack) -> None:
    request = vision_pb2.EncodeRequest(
        request_id="cache", images=[vision_pb2.ImageInput(data=png_bytes(896, 448, seed=31))]
    )

    def encode() -> tuple[bytes, vision_pb2.EncodeDone]:
        with grpc.insecure_channel(
            f"127.0.0.1:{dvd_stack.vision_port}", options=CHANNEL_OPTIONS
        ) as channel:
            replies = list(vision_pb2_grpc.VisionServiceStub(channel).Encode(request, timeout=60))
        chunks = sorted(
            (r.chunk for r in replies if r.HasField("chunk")), key=lambda c: c.row_offset
        )
        return b"".join(c.data for c in chunks), replies[-1].done

    first, first_done = encode()
    again, again_done = encode()
    assert first_done.timings.encode_ns > 0
    assert again_done.timings.encode_ns == 0 and again_done.timings.preprocess_ns == 0
    assert again == first and again_done.num_tokens == first_done.num_tokens == 3 * 256
