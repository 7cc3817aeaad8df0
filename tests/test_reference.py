"""DvD's greedy output equals an independent reference: transformers' InternVL model.

The reference is transformers' own `InternVLForConditionalGeneration`, in fp32, loaded
from the -HF layout of the same weights, fed by transformers' own InternVL image processor
(GotOcr2ImageProcessorPil: tiling, resize, normalisation) and the -HF chat template. The
stack under test serves the original layout, in fp32, through vision server + language
server (vLLM). Nothing but the weights and the tokenizer files is shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.images import png_bytes
from tests.stack import Stack, chat_message, generate, start_stack

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 12
CASES = {
    "text only": [],
    "one tile": [(448, 448)],
    "wide, 13 tiles": [(1024, 768)],
    "tall": [(300, 900)],
    "two images": [(600, 300), (256, 512)],
}


@pytest.fixture(scope="module")
def fp32_stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        tiny_checkpoint, tmp_path_factory.mktemp("fp32-stack"), "--dtype", "float32"
    )
    yield stack
    stack.stop()


class Reference:
    def __init__(self, hf_checkpoint: Path) -> None:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )

        self.model = InternVLForConditionalGeneration.from_pretrained(
            hf_checkpoint, dtype=torch.float32
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint, trust_remote_code=False)
        self.processor = GotOcr2ImageProcessorPil.from_pretrained(hf_checkpoint)
        self.tokens_per_tile = self.model.config.image_seq_length

    def generate(self, text: str, images: list[bytes]) -> list[int]:
        return self.generate_with_prompt_length(text, images)[0]

    def generate_with_prompt_length(self, text: str, images: list[bytes]) -> tuple[list[int], int]:
        """(greedy tokens, prompt tokens) the way transformers' own pipeline makes them."""
        import io

        from PIL import Image

        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        kwargs = {}
        if images:
            pil = [Image.open(io.BytesIO(i)).convert("RGB") for i in images]
            processed = self.processor(pil, crop_to_patches=True, return_tensors="pt")
            for tiles in processed["num_patches"]:
                expanded = (
                    "<img>" + "<IMG_CONTEXT>" * (int(tiles) * self.tokens_per_tile) + "</img>"
                )
                prompt = prompt.replace("<IMG_CONTEXT>\n", expanded + "\x00\n", 1)
            prompt = prompt.replace("\x00", "")
            kwargs["pixel_values"] = processed["pixel_values"].to(torch.float32)
        input_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **kwargs
            )
        return output[0, input_ids.shape[1] :].tolist(), int(input_ids.shape[1])

    def tiles(self, image: bytes) -> int:
        import io

        from PIL import Image

        pil = Image.open(io.BytesIO(image)).convert("RGB")
        return int(self.processor([pil], crop_to_patches=True)["num_patches"][0])

    def same_tokens(self, served: list[int], expected: list[int]) -> bool:
        """transformers keeps the EOS token it stopped on; vLLM reports it as a token too."""
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return served == expected or served == [t for t in expected if t != eos]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_hf: Path) -> Reference:
    return Reference(tiny_checkpoint_hf)


@pytest.mark.parametrize("case", list(CASES))
def test_dvd_greedy_tokens_equal_transformers_reference(
    case: str, fp32_stack: Stack, reference: Reference
) -> None:
    images = [png_bytes(w, h, seed=i + 11) for i, (w, h) in enumerate(CASES[case])]
    text = "Describe the picture in detail."
    served, _ = generate(
        fp32_stack.language_port, [chat_message(text, images)], max_tokens=MAX_NEW_TOKENS
    )
    expected = reference.generate(text, images)
    assert reference.same_tokens(served, expected), (served, expected)
    assert len(served) > 1


def test_the_hf_layout_serves_the_same_tokens_as_the_original(
    tiny_checkpoint_hf: Path, dvd_stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Both published layouts of the same weights go through the same loading code."""
    hf_stack = start_stack(tiny_checkpoint_hf, tmp_path_factory.mktemp("hf-stack"))
    try:
        for sizes in ([], [(1024, 768)], [(600, 300), (256, 512)]):
            images = [png_bytes(w, h, seed=i + 41) for i, (w, h) in enumerate(sizes)]
            messages = [chat_message("Describe the picture in detail.", images)]
            original = generate(dvd_stack.language_port, messages, max_tokens=MAX_NEW_TOKENS)
            assert generate(hf_stack.language_port, messages, max_tokens=MAX_NEW_TOKENS) == original
    finally:
        hf_stack.stop()


# --- checkpoints transformers wrote, served as they are ------------------------------------

# image sizes (width, height) and InternVL's tiles for each: one tile, or a grid + thumbnail
TILE_CASES = {
    "1 tile": ([(448, 448)], [1]),
    "3 tiles": ([(896, 448)], [3]),
    "4 tiles": ([(448, 1344)], [4]),
    "5 tiles": ([(896, 896)], [5]),
    "1 + 3 tiles": ([(448, 448), (448, 896)], [1, 3]),
}


@pytest.fixture(scope="module", params=["tiny-tied", "tiny-qwen2"])
def transformers_written(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Reference]]:
    """An -HF checkpoint saved by transformers (tied Qwen3 head, no lm_head tensor; or a
    Qwen2 LLM), served in fp32 as it is, and transformers' fp32 model of the same folder."""
    from dvd.checkpoint import make_checkpoint

    preset = request.param
    folder = make_checkpoint(tmp_path_factory.mktemp(preset) / preset, preset, "hf", seed=5)
    stack = start_stack(folder, tmp_path_factory.mktemp(f"{preset}-stack"), "--dtype", "float32")
    try:
        yield stack, Reference(folder)
    finally:
        stack.stop()


@pytest.mark.parametrize("case", list(TILE_CASES))
def test_transformers_written_checkpoint_serves_transformers_tokens(
    case: str, transformers_written: tuple[Stack, Reference]
) -> None:
    stack, reference = transformers_written
    sizes, tiles = TILE_CASES[case]
    images = [png_bytes(w, h, seed=i + 61) for i, (w, h) in enumerate(sizes)]
    assert [reference.tiles(image) for image in images] == tiles
    text = "What do you see?"
    served, usage = generate(
        stack.language_port, [chat_message(text, images)], max_tokens=MAX_NEW_TOKENS
    )
    expected, prompt_tokens = reference.generate_with_prompt_length(text, images)
    assert reference.same_tokens(served, expected), (served, expected)
    assert usage.prompt_tokens == prompt_tokens
    assert len(served) > 1
