"""ViR (InternVL3.5-Flash's Visual Resolution Router): decisions, features, end to end."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from dvd.checkpoint import CheckpointWeights, FlashConfig, load_config, make_checkpoint
from dvd.vir_mode import VirMode
from tests.images import data_url, png_bytes
from tests.stack import Stack, chat_message, free_port, generate, start_stack
from vision_server.encoder import TilingLimits, VisionEncoder
from vision_server.tile_features import select_rows
from vision_server.vir import route

WIDE = (1024, 768)  # 4x3 grid + thumbnail = 13 tiles


def quantile_by_hand(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's and torch's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def decide_by_hand(p: list[float], flash: FlashConfig) -> list[bool]:
    threshold = quantile_by_hand(p, flash.relative_threshold)
    return [value > threshold and value >= flash.absolute_threshold for value in p]


@pytest.mark.parametrize(
    ("probabilities", "relative", "absolute"),
    [
        ([0.7], 0.5, 0.0),  # one tile: never above its own quantile
        ([0.4, 0.4, 0.4, 0.4], 0.5, 0.0),  # all equal: none strictly above
        ([0.1, 0.9, 0.5, 0.3, 0.8], 0.5, 0.0),
        ([0.1, 0.9, 0.5, 0.3, 0.8], 0.5, 0.85),  # the absolute bar removes 0.8
        ([0.1, 0.9, 0.5, 0.3, 0.8], 0.0, 0.0),  # everything above the minimum
        ([0.1, 0.9, 0.5, 0.3, 0.8], 1.0, 0.0),  # nothing above the maximum
        ([0.2, 0.6], 0.25, 0.5),  # quantile between two tiles
    ],
)
def test_route_follows_the_quantile_and_absolute_rules(
    probabilities: list[float], relative: float, absolute: float
) -> None:
    flash = FlashConfig(True, relative, absolute)
    chosen = route(torch.tensor(probabilities), flash).tolist()
    assert chosen == decide_by_hand(probabilities, flash)


@pytest.fixture(scope="module")
def flash_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("flash") / "internvl3_5-tiny-flash", preset="tiny-flash"
    )


def layer_norm(x: torch.Tensor, weights: dict, name: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weights[f"{name}.weight"] + weights[f"{name}.bias"]


def attention(query: torch.Tensor, tokens: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    dim = tokens.shape[-1]
    heads, head_dim = 16, dim // 16
    wq, wk, wv = w[f"{name}.in_proj_weight"].split(dim)
    bq, bk, bv = w[f"{name}.in_proj_bias"].split(dim)
    q = (query @ wq.T + bq).view(-1, 1, heads, head_dim).transpose(1, 2)
    k = (tokens @ wk.T + bk).view(tokens.shape[0], -1, heads, head_dim).transpose(1, 2)
    v = (tokens @ wv.T + bv).view(tokens.shape[0], -1, heads, head_dim).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
    mixed = (scores @ v).transpose(1, 2).reshape(-1, 1, dim)
    return mixed @ w[f"{name}.out_proj.weight"].T + w[f"{name}.out_proj.bias"]


def router_by_hand(tokens: torch.Tensor, w: dict) -> torch.Tensor:
    """The router's formulas written out: pooling, residual gating MLP, softmax; column 0."""
    gelu = torch.nn.functional.gelu
    query = w["pooling_before_gating.query_token"].expand(tokens.shape[0], 1, -1)
    x = layer_norm(
        attention(query, tokens, w, "pooling_before_gating.attn1"), w, "pooling_before_gating.norm1"
    )
    for _ in range(3):
        x = layer_norm(
            attention(x, tokens, w, "pooling_before_gating.attn2"), w, "pooling_before_gating.norm2"
        )
    x = x.squeeze(1)
    for k in range(1, 5):
        b = f"gating.block{k}"
        hidden = gelu(x @ w[f"{b}.0.weight"].T + w[f"{b}.0.bias"])
        x = x + layer_norm(hidden @ w[f"{b}.3.weight"].T + w[f"{b}.3.bias"], w, f"{b}.5")
    logits = layer_norm(x, w, "gating.gate.0") @ w["gating.gate.1.weight"].T
    return (logits + w["gating.gate.1.bias"]).softmax(-1)[:, 0]


def test_router_on_a_batch_equals_the_formulas(flash_checkpoint: Path) -> None:
    config = load_config(flash_checkpoint)
    encoder = VisionEncoder(config, "cpu", torch.float32)
    weights = CheckpointWeights(config).vision_state_dict(dtype=torch.float32)
    tiles = encoder.preprocess(png_bytes(*WIDE, seed=21), TilingLimits(1, 12, True, 10**8))
    features = encoder.encode(tiles.pixel_values, with_vir=True)
    grid = encoder.model._patch_grid(tiles.pixel_values)
    expected = router_by_hand(grid.reshape(grid.shape[0], -1, grid.shape[-1]), weights)
    torch.testing.assert_close(features.compress_probability, expected, rtol=1e-4, atol=1e-5)
    assert config.flash is not None
    chosen = route(features.compress_probability, config.flash).tolist()
    assert chosen == decide_by_hand(expected.tolist(), config.flash)
    assert 0 < sum(chosen) < len(chosen), "a 13-tile image should get a mix of resolutions"
    ((rows, tokens),) = select_rows(VirMode.ROUTER, [features], config.flash)
    assert tokens == [64 if c else 256 for c in chosen]
    # A compressed tile's rows are mlp2 over the 1/4 pixel shuffle of the 32x32 grid.
    first_small = chosen.index(True)
    start = sum(tokens[:first_small])
    torch.testing.assert_close(rows[start : start + 64], features.sixteenth[first_small])


def test_modes_a_checkpoint_without_vir_cannot_serve(tiny_checkpoint: Path) -> None:
    from dvd.errors import InvalidInput

    encoder = VisionEncoder(load_config(tiny_checkpoint), "cpu", torch.bfloat16)
    assert encoder.default_mode() is VirMode.QUARTER
    for mode in (VirMode.ROUTER, VirMode.SIXTEENTH):
        with pytest.raises(InvalidInput, match=r"InternVL3\.5-Flash"):
            encoder.check_mode(mode)


@pytest.fixture(scope="module")
def flash_stacks(
    flash_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Stack, int]]:
    metrics_port = free_port()
    dvd = start_stack(
        flash_checkpoint,
        tmp_path_factory.mktemp("flash-dvd"),
        "--vision-metrics-port",
        str(metrics_port),
    )
    coupled = start_stack(flash_checkpoint, tmp_path_factory.mktemp("flash-coupled"), "--coupled")
    yield dvd, coupled, metrics_port
    dvd.stop()
    coupled.stop()


@pytest.mark.integration
def test_flash_dvd_equals_coupled_and_usage_counts_the_routed_tokens(
    flash_stacks: tuple[Stack, Stack, int], flash_checkpoint: Path
) -> None:
    dvd, coupled, metrics_port = flash_stacks
    image = png_bytes(*WIDE, seed=23)
    messages = [chat_message("What is in the picture?", [image])]
    dvd_ids, dvd_usage = generate(dvd.language_port, messages, max_tokens=16)
    coupled_ids, coupled_usage = generate(coupled.language_port, messages, max_tokens=16)
    assert dvd_ids == coupled_ids
    assert dvd_usage == coupled_usage

    config = load_config(flash_checkpoint)
    encoder = VisionEncoder(config, "cpu", torch.bfloat16)
    tiles = encoder.preprocess(image, TilingLimits(1, 12, True, 10**8))
    ((_, tokens),) = select_rows(
        VirMode.ROUTER, [encoder.encode(tiles.pixel_values, with_vir=True)], config.flash
    )
    assert 64 in tokens and 256 in tokens
    assert dvd_usage.image_tokens == sum(tokens) + 2

    api = openai.OpenAI(base_url=dvd.base_url + "/v1", api_key="unused", max_retries=0)
    model = api.models.list().data[0].id
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    usage = {
        mode: api.chat.completions.create(
            model=model, messages=chat, max_tokens=2, extra_body={"vir_mode": mode}
        ).usage.prompt_tokens
        for mode in ("router", "always-1/4", "always-1/16")
    }
    compressed = tokens.count(64)
    assert usage["always-1/4"] - usage["router"] == 192 * compressed
    assert usage["always-1/4"] - usage["always-1/16"] == 192 * len(tokens)

    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'dvd_vision_tiles_routed_total{resolution="1/16"}' in metrics
    assert "dvd_vision_visual_tokens_saved_total" in metrics


@pytest.mark.integration
def test_a_vir_mode_the_checkpoint_lacks_is_a_400(dvd_stack: Stack) -> None:
    api = openai.OpenAI(base_url=dvd_stack.base_url + "/v1", api_key="unused", max_retries=0)
    chat = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(64, 64))}}],
        }
    ]
    with pytest.raises(openai.BadRequestError, match=r"InternVL3\.5-Flash"):
        api.chat.completions.create(
            model=api.models.list().data[0].id,
            messages=chat,
            max_tokens=2,
            extra_body={"vir_mode": "router"},
        )
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(
            model=api.models.list().data[0].id,
            messages=chat,
            max_tokens=2,
            extra_body={"vir_mode": "sometimes"},
        )
