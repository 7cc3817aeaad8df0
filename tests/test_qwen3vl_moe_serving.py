"""Qwen3-VL-MoE served end to end (issue 13): `dvd up --model QWEN3VL_MOE_DIR` answers.

qwen3vl-moe-tiny (`dvd make-checkpoint`'s writer: transformers' own
`Qwen3VLMoeForConditionalGeneration`, the experts in the releases' orientation) behind ONE
`dvd up` over grpc, fp32: the same vision tower as dense Qwen3-VL, and vLLM's Qwen3-VL-MoE
(our `DvdQwen3VLMoeForConditionalGeneration`: DeepStack kept without the tower) with vLLM's
CPU fused-MoE. Fidelity as in test_qwen3vl_serving.py: greedy tokens over the language
server's Generate equal transformers' `generate` in fp32, fed the same preprocessing's pixels
and the template's ids with each pad expanded, for one image and for text only; usage's
prompt tokens equal the reference's prompt length.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, load_qwen3vl_config
from tests.stack import Stack, chat_message, generate, start_stack
from tests.test_qwen3vl_serving import CASES, NEW_TOKENS, REPO, _reference

# 80-150 s on a shared 2-core machine, mostly the stack's start (~50 s and more) and stop (~25 s)
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.checkpoint import make_checkpoint

    folder = tmp_path_factory.mktemp("qwen3vl-moe") / "qwen3vl-moe-tiny"
    return make_checkpoint(folder, "qwen3vl-moe-tiny")


@pytest.fixture(scope="module")
def config(moe: Path) -> Qwen3VLConfig:
    return load_qwen3vl_config(moe)


@pytest.fixture(scope="module")
def stack(moe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PYTHONPATH puts this checkout first, so the children and vLLM's processes import it."""
    with pytest.MonkeyPatch.context() as patch:
        path = os.environ.get("PYTHONPATH")
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), path) if p))
        workdir = tmp_path_factory.mktemp("qwen3vl-moe-grpc")
        started = start_stack(moe, workdir, "--dtype", "float32", "--transport", "grpc")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def reference(moe: Path) -> Any:
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(moe, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(moe: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(moe)


def test_the_checkpoint_is_moe_in_the_releases_layout(config: Qwen3VLConfig) -> None:
    from dvd.checkpoint.qwen3vl_verify import verify_qwen3vl

    assert config.is_moe and config.llm_config["num_experts"] == 8
    assert config.text_config["norm_topk_prob"] is True  # vLLM's block reads it
    verify_qwen3vl(config)  # experts (E, hidden, 2 x inter) and (E, inter, hidden)


@pytest.mark.parametrize("name", ["one image", "text only"])
def test_served_tokens_equal_transformers(
    name: str, stack: Stack, reference: Any, tokenizer: Any, config: Qwen3VLConfig, moe: Path
) -> None:
    images, text = CASES[name]
    expected, prompt_tokens, _ = _reference(reference, tokenizer, config, moe, name)
    got, usage = generate(stack.language_port, [chat_message(text, images)], NEW_TOKENS)
    assert got == expected
    assert usage.prompt_tokens == prompt_tokens  # type: ignore[attr-defined]
