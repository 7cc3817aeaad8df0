"""Qwen3-VL's language side at engine level (issue 13, step 3): vLLM's own Qwen3-VL model
without its tower, fed our vision encoder's rows and grids, DeepStack kept on.

Fidelity (integration; one vLLM engine for the module, fp32, qwen3vl-tiny): features from
`vision_server.qwen3vl`'s encoder -> `Qwen3VLEngine` give the same greedy tokens, the same
log-probabilities (within 1e-4) and the same prompt length as transformers'
`Qwen3VLForConditionalGeneration.generate` on the same checkpoint, fed pixel values from the
same preprocessing, for one image, two images of different sizes, a video and text alone.
DeepStack is shown to be on: the same image with its DeepStack columns zeroed gives other
log-probabilities (a model that dropped DeepStack would give the same ones). The prompt
given to vLLM keeps one pad per item; the reference's ids are vLLM's expansion written out
by hand (transformers' AutoProcessor cannot load here: its video processor needs
torchvision), so the prompt-length check is that both sides expand alike.

The rest is unit-level: the view, the weight names the loader yields, the engine arguments,
the request checks, and the fit check against stand-in classes. A vLLM that does not fit
cannot be installed next to the one that does, so "a vLLM it does not fit" is a stand-in
class lacking a method or no longer using an attribute, run through the same check.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dvd.checkpoint.qwen3vl_config import Qwen3VLConfig, load_qwen3vl_config
from language_server.engine import EngineSettings, Sampling
from language_server.engine_args import build_engine_args, engine_kwargs
from language_server.llm_view import SOURCE_FILE, read_source
from language_server.qwen3vl_deepstack import (
    CHECKED_VLLM,
    VllmDoesNotFit,
    check_deepstack_fit,
    misfits,
)
from language_server.qwen3vl_engine import Qwen3VLEngine, VisionItem, qwen3vl_request
from language_server.qwen3vl_view import (
    ARCHITECTURES,
    QWEN3VL_ENGINE_ARGS,
    prepare_qwen3vl_view,
)
from language_server.vllm_plugin import iter_llm_weights, qwen3vl_weight_name
from vision_server.qwen3vl.encoder import Qwen3VLEncoder
from vision_server.qwen3vl.preprocess import VisionInput, preprocess_image, preprocess_video
from vision_server.qwen3vl.processor_config import (
    load_image_processor_config,
    load_video_processor_config,
)

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
LOGPROB_ATOL = 1e-4  # fp32 on both sides; seen: 1e-5


@pytest.fixture(scope="module")
def tiny(qwen3vl_tiny_checkpoint: Path) -> Path:
    return qwen3vl_tiny_checkpoint


@pytest.fixture(scope="module")
def config(tiny: Path) -> Qwen3VLConfig:
    return load_qwen3vl_config(tiny)


@pytest.fixture(scope="module")
def view(config: Qwen3VLConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_qwen3vl_view(config, tmp_path_factory.mktemp("cache"))


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


# --- the view, the weights, the engine arguments -----------------------------------------


def test_view_names_our_class_and_keeps_the_checkpoints_config(
    config: Qwen3VLConfig, view: Path, tiny: Path
) -> None:
    written = json.loads((view / "config.json").read_text())
    stored = json.loads((tiny / "config.json").read_text())
    assert written["architectures"] == ["DvdQwen3VLForConditionalGeneration"]
    assert {k: v for k, v in written.items() if k != "architectures"} == {
        k: v for k, v in stored.items() if k != "architectures"
    }
    for name in ("tokenizer.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (view / name).resolve() == (tiny / name).resolve()
    assert (view / "model.safetensors").resolve() == (tiny / "model.safetensors").resolve()
    assert read_source(view) == tiny.resolve()
    assert json.loads((view / SOURCE_FILE).read_text())["family"] == "qwen3_vl"
    assert set(ARCHITECTURES.values()) == {
        "DvdQwen3VLForConditionalGeneration",
        "DvdQwen3VLMoeForConditionalGeneration",
    }


def test_loader_yields_the_llm_under_the_checkpoints_names_and_no_vision_tensor(
    config: Qwen3VLConfig, view: Path
) -> None:
    from dvd.checkpoint.qwen3vl_verify import expected_llm_tensors

    yielded = dict(iter_llm_weights(str(view)))
    expected = {
        "model.language_model." + name[len("model.") :] if name.startswith("model.") else name
        for name in expected_llm_tensors(config)
    }
    assert set(yielded) == expected
    assert "lm_head.weight" in yielded  # qwen3vl-tiny's head is not tied
    assert not any("visual" in name for name in yielded)


def test_weight_names_map_both_prefix_spellings_and_drop_a_tied_head() -> None:
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert qwen3vl_weight_name(name, tied=False) == name
    assert qwen3vl_weight_name("language_model.model.norm.weight", False) == (
        "model.language_model.norm.weight"
    )
    assert qwen3vl_weight_name("lm_head.weight", tied=False) == "lm_head.weight"
    assert qwen3vl_weight_name("lm_head.weight", tied=True) is None
    assert qwen3vl_weight_name("model.visual.blocks.0.attn.qkv.weight", False) is None
    assert qwen3vl_weight_name("visual.merger.linear_fc1.weight", False) is None


def test_engine_arguments_skip_the_tower_and_take_embeddings(view: Path) -> None:
    settings = EngineSettings(view, "float32", 1024, 2, 2**26, view_args=QWEN3VL_ENGINE_ARGS)
    kwargs = engine_kwargs(settings)
    assert kwargs["limit_mm_per_prompt"] == {"image": 0, "video": 0}
    assert kwargs["enable_mm_embeds"] is True
    assert "enable_prompt_embeds" not in kwargs
    assert kwargs["load_format"] == "dvd_llm_only"
    args = build_engine_args(settings)
    assert args.enable_mm_embeds and args.limit_mm_per_prompt == {"image": 0, "video": 0}
    for owned in ("limit_mm_per_prompt", "enable_mm_embeds", "language_model_only"):
        extra = ((owned, True),)
        with pytest.raises(ValueError, match="dvd-serve sets it itself"):
            engine_kwargs(EngineSettings(view, "float32", 1024, 2, 2**26, extra=extra))


# --- the request ---------------------------------------------------------------------------


def _item(config: Qwen3VLConfig, grid: tuple[int, int, int], modality: str = "image") -> VisionItem:
    rows = torch.zeros(config.tokens_of_grid(*grid), config.feature_width)
    times = tuple(float(i) for i in range(grid[0])) if modality == "video" else ()
    return VisionItem(modality, rows, grid, f"hash-{modality}-{grid}", times)


def test_request_carries_rows_grids_and_content_hashes(config: Qwen3VLConfig) -> None:
    images = [_item(config, (1, 14, 20)), _item(config, (1, 4, 6))]
    video = _item(config, (2, 6, 8), "video")
    ids = [1, config.image_token_id, 2, config.video_token_id, config.image_token_id]
    request = qwen3vl_request(config, ids, [images[0], video, images[1]])
    assert request["prompt_token_ids"] == ids
    image = request["multi_modal_data"]["image"]
    assert image["image_embeds"].shape == (70 + 6, config.feature_width)
    assert image["image_grid_thw"].tolist() == [[1, 14, 20], [1, 4, 6]]
    assert request["multi_modal_data"]["video"]["timestamps"] == [[0.0, 1.0]]
    assert request["multi_modal_uuids"] == {
        "image": [images[0].uuid, images[1].uuid],
        "video": [video.uuid],
    }
    assert qwen3vl_request(config, "just text", []) == {"prompt": "just text"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": torch.zeros(70, 64)}, r"rows \(70, 64\), expected \(70, 256\)"),
        ({"rows": torch.zeros(69, 256)}, "expected"),
        ({"grid_thw": (1, 14, 21)}, "merge"),
        ({"grid_thw": (2, 14, 20)}, "an image has one temporal patch"),
        ({"uuid": ""}, "content hash"),
        ({"modality": "audio"}, "modality"),
        ({"rows": torch.zeros(70, 256, dtype=torch.int64)}, "floating point"),
    ],
)
def test_request_refuses_items_that_do_not_fit(
    config: Qwen3VLConfig, change: dict[str, Any], message: str
) -> None:
    fields = {**_item(config, (1, 14, 20)).__dict__, **change}
    with pytest.raises(ValueError, match=message):
        qwen3vl_request(config, [config.image_token_id], [VisionItem(**fields)])


def test_request_refuses_pads_that_do_not_match_the_items(config: Qwen3VLConfig) -> None:
    item = _item(config, (1, 4, 6))
    with pytest.raises(ValueError, match=re.escape("2 <|image_pad|> tokens for 1 image items")):
        qwen3vl_request(config, [config.image_token_id] * 2, [item])
    video = _item(config, (2, 4, 6), "video")
    with pytest.raises(ValueError, match="1 timestamps for 2 temporal patches"):
        one_time = VisionItem(**{**video.__dict__, "timestamps": (0.0,)})
        qwen3vl_request(config, [config.video_token_id], [one_time])


# --- the fit check -----------------------------------------------------------------------


class _FittingStandIn:
    """The shape of vLLM 0.32's class as far as the check is concerned."""

    def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
        self.visual = None
        self.use_deepstack = False
        self.deepstack_num_level = 0
        self.visual_dim = 0
        self.multiscale_dim = 0

    def embed_input_ids(
        self, input_ids: Any, multimodal_embeddings: Any = None, *, is_multimodal: Any = None
    ) -> Any:
        if self.use_deepstack:
            self._compute_deepstack_embeds(input_ids, multimodal_embeddings, is_multimodal)
            self._set_deepstack_input_embeds(None)

    def _compute_deepstack_embeds(
        self, inputs_embeds: Any, multimodal_embeddings: Any, is_multimodal: Any
    ) -> Any:
        return self.visual_dim, self.multiscale_dim, self.deepstack_num_level

    def _set_deepstack_input_embeds(self, deepstack_input_embeds: Any) -> None:
        self.deepstack_input_embeds_num_tokens = [
            self.deepstack_input_embeds[i] for i in range(self.deepstack_num_level)
        ]

    def _get_deepstack_input_embeds(self, num_tokens: int) -> Any:
        return getattr(self, "deepstack_input_embeds", None), self.deepstack_num_level

    def _clear_deepstack_input_embeds(self, num_tokens: int) -> None:
        if getattr(self, "deepstack_input_embeds_num_tokens", 0):
            self.deepstack_input_embeds[: self.deepstack_num_level] = []

    def forward(
        self,
        input_ids: Any,
        positions: Any,
        intermediate_tensors: Any = None,
        inputs_embeds: Any = None,
        **kwargs: Any,
    ) -> Any:
        self._get_deepstack_input_embeds(0)
        self._clear_deepstack_input_embeds(0)

    def _process_image_input(self, image_input: Any) -> Any:
        return self.visual

    def _process_video_input(self, video_input: Any) -> Any:
        return self.visual


class _RenamedBuffers(_FittingStandIn):
    """A vLLM whose buffers moved: `_get_deepstack_input_embeds` reads another name."""

    def _get_deepstack_input_embeds(self, num_tokens: int) -> Any:
        return self.deepstack_buffers, self.deepstack_num_level  # type: ignore[attr-defined]


class _WithoutSetter(_FittingStandIn):
    _set_deepstack_input_embeds = None  # type: ignore[assignment]


class _OtherForward(_FittingStandIn):
    def forward(self, input_ids: Any, inputs_embeds: Any = None) -> Any:  # type: ignore[override]
        self._get_deepstack_input_embeds(0)
        self._clear_deepstack_input_embeds(0)


def test_the_check_passes_a_class_shaped_like_vllm_032s() -> None:
    assert misfits(_FittingStandIn) == []


@pytest.mark.parametrize(
    ("stand_in", "named"),
    [
        (
            _RenamedBuffers,
            "_RenamedBuffers._get_deepstack_input_embeds no longer uses 'deepstack_input_embeds'",
        ),
        (_WithoutSetter, "_WithoutSetter._set_deepstack_input_embeds is missing"),
        (
            _OtherForward,
            "_OtherForward.forward takes (input_ids, inputs_embeds), expected "
            "(input_ids, positions, intermediate_tensors, inputs_embeds)",
        ),
    ],
)
def test_a_vllm_that_does_not_fit_is_refused_naming_version_and_attribute(
    stand_in: type, named: str
) -> None:
    with pytest.raises(VllmDoesNotFit) as refused:
        check_deepstack_fit(stand_in, "0.99.0")
    message = str(refused.value)
    assert message.startswith("vLLM 0.99.0 does not fit")
    assert named in message
    assert CHECKED_VLLM[0] in message


def test_restore_deepstack_sets_what_vllms_init_skipped(config: Qwen3VLConfig) -> None:
    from types import SimpleNamespace

    from language_server.qwen3vl_deepstack import restore_deepstack

    hf = SimpleNamespace(
        vision_config=SimpleNamespace(deepstack_visual_indexes=[0, 1, 2]),
        text_config=SimpleNamespace(hidden_size=64),
    )
    model = SimpleNamespace(config=hf, visual_dim=64, use_deepstack=False, multiscale_dim=0)
    assert restore_deepstack(model, 512) == 3
    assert (model.use_deepstack, model.deepstack_num_level, model.multiscale_dim) == (True, 3, 192)
    assert [tuple(b.shape) for b in model.deepstack_input_embeds] == [(512, 64)] * 3
    assert model.deepstack_input_embeds_num_tokens == 0
    with pytest.raises(VllmDoesNotFit, match="out_hidden_size 32 is not the text hidden size"):
        restore_deepstack(SimpleNamespace(config=hf, visual_dim=32), 512)


def test_the_processor_loads_without_torchvision(view: Path, config: Qwen3VLConfig) -> None:
    import sys

    from language_server.qwen3vl_compat import (
        TORCHVISION_MODULE,
        Qwen3VLProcessorWithoutTorchvision,
        allow_qwen_vl_import,
        torchvision_missing,
    )

    if not torchvision_missing():
        pytest.skip("torchvision is installed: vLLM and transformers run unchanged")
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    assert allow_qwen_vl_import() and allow_qwen_vl_import()  # idempotent
    assert sys.modules[TORCHVISION_MODULE].smart_resize is pil.smart_resize  # type: ignore[attr-defined]
    processor = Qwen3VLProcessorWithoutTorchvision.from_pretrained(str(view))
    assert (processor.image_token_id, processor.video_token_id) == (
        config.image_token_id,
        config.video_token_id,
    )
    assert processor.video_processor.merge_size == config.vision.spatial_merge_size
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_the_installed_vllm_fits() -> None:
    from language_server import qwen3vl_model

    qwen3vl_model.check_installed_vllm()


def test_engine_start_stops_before_vllm_on_a_vllm_that_does_not_fit(
    config: Qwen3VLConfig, view: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from language_server import qwen3vl_model
    from language_server.engine import LlmEngine

    def no_start(settings: EngineSettings) -> LlmEngine:
        raise AssertionError("vLLM was started")

    monkeypatch.setattr(qwen3vl_model, "Qwen3VLForConditionalGeneration", _RenamedBuffers)
    monkeypatch.setattr(qwen3vl_model, "installed_vllm_version", lambda: "0.33.1")
    monkeypatch.setattr(LlmEngine, "start", no_start)
    with pytest.raises(VllmDoesNotFit, match=r"vLLM 0\.33\.1 does not fit.*deepstack_input_embeds"):
        Qwen3VLEngine.start(config, EngineSettings(view, "float32", 1024, 2, 2**26))


# --- fidelity against transformers (one engine) ------------------------------------------


@dataclass(frozen=True)
class Case:
    """One prompt: its items as preprocessed, and where they go."""

    items: list[VisionInput]
    text: str  # user text after the items


@dataclass
class Generated:
    tokens: list[int]
    logprobs: list[float]
    prompt_tokens: int


@pytest.fixture(scope="module")
def encoder(config: Qwen3VLConfig) -> Qwen3VLEncoder:
    return Qwen3VLEncoder(config, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Any:
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def engine(config: Qwen3VLConfig, view: Path) -> Iterator[tuple[Qwen3VLEngine, Any]]:
    """One vLLM engine (its core in its own process) and the event loop it runs in.

    vLLM's engine core and its model-inspection subprocess import our plugin through the
    `vllm.general_plugins` entry point and our model class by module name: PYTHONPATH
    makes them import this checkout's code (the installed package may be another one's).
    """
    with pytest.MonkeyPatch.context() as patch:
        path = os.environ.get("PYTHONPATH")
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), path) if p))
        loop = asyncio.new_event_loop()
        settings = EngineSettings(
            view, "float32", 1024, 2, 2**26, max_num_batched_tokens=1024, enforce_eager=True
        )

        async def start() -> Qwen3VLEngine:
            return Qwen3VLEngine.start(config, settings)

        started = loop.run_until_complete(start())
        try:
            yield started, loop
        finally:
            started.shutdown()
            pending = asyncio.all_tasks(loop)  # AsyncLLM's output handler
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()


def _vllm_generate(
    engine: tuple[Qwen3VLEngine, Any], prompt: list[int], items: Sequence[VisionItem]
) -> Generated:
    llm, loop = engine

    async def run() -> Generated:
        out = Generated([], [], 0)
        sampling = Sampling(max_tokens=NEW_TOKENS, logprobs=True)
        async for delta in llm.generate(uuid.uuid4().hex, prompt, items, sampling):
            out.tokens += delta.token_ids
            out.logprobs += delta.logprobs
            out.prompt_tokens = delta.prompt_tokens or out.prompt_tokens
        return out

    return loop.run_until_complete(run())  # type: ignore[no-any-return]


def _prompt_ids(tokenizer: Any, case: Case, config: Qwen3VLConfig) -> tuple[list[int], list[int]]:
    """(vLLM's prompt: one pad per item, the reference's: the pads expanded as vLLM does,
    a video per temporal patch with its timestamp text tokenized alone)."""
    ids = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    short, full = list(ids), list(ids)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    for item in case.items:
        tokens_per_patch = config.tokens_of_grid(1, *item.grid_thw[1:])
        if item.modality == "image":
            short += [start, config.image_token_id, end]
            full += [start] + [config.image_token_id] * tokens_per_patch + [end]
            continue
        short += [config.video_token_id]  # a bare pad: vLLM writes the per-frame markers
        for seconds in item.timestamps:
            full += tokenizer.encode(f"<{seconds:.1f} seconds>", add_special_tokens=False)
            full += [start] + [config.video_token_id] * tokens_per_patch + [end]
    tail = tokenizer(f"{case.text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
        "input_ids"
    ]
    return short + tail, full + tail


def _reference_generate(
    reference: Any, prompt: list[int], case: Case, config: Qwen3VLConfig
) -> Generated:
    input_ids = torch.tensor([prompt])
    kinds = {config.image_token_id: 1, config.video_token_id: 2}
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "mm_token_type_ids": torch.tensor([[kinds.get(t, 0) for t in prompt]]),
    }
    for modality, prefix in (("image", ""), ("video", "_videos")):
        chosen = [item for item in case.items if item.modality == modality]
        if chosen:
            inputs[f"pixel_values{prefix}"] = torch.cat([item.pixel_values for item in chosen])
            inputs[f"{modality}_grid_thw"] = torch.tensor([item.grid_thw for item in chosen])
    with torch.no_grad():
        out = reference.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[token])
        for step, token in zip(out.logits, tokens, strict=True)
    ]
    return Generated(tokens, logprobs, len(prompt))


def _vision_items(encoder: Qwen3VLEncoder, case: Case) -> list[VisionItem]:
    encoded = encoder.encode(case.items)
    return [
        VisionItem(
            item.modality, rows.features, rows.grid_thw, f"{i}-{uuid.uuid4().hex}", item.timestamps
        )
        for i, (item, rows) in enumerate(zip(case.items, encoded, strict=True))
    ]


def _case(name: str, tiny: Path) -> Case:
    images = load_image_processor_config(tiny)
    if name == "one image":
        return Case([preprocess_image(_image(96, 64), images)], "What is this?")
    if name == "two images":
        first = preprocess_image(_image(96, 64, seed=1), images)
        second = preprocess_image(_image(448, 320, seed=2), images)  # 140 tokens
        assert first.grid_thw != second.grid_thw
        return Case([first, second], "Compare them.")
    if name == "video":
        frames = [np.asarray(_image(128, 96, seed=10 + i)) for i in range(4)]
        clip = preprocess_video(frames, [0.0, 0.5, 1.0, 1.5], load_video_processor_config(tiny))
        return Case([clip], "What happens?")
    return Case([], "Tell me a story.")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["one image", "two images", "video", "text only"])
def test_vllm_fed_our_features_generates_as_transformers(
    name: str,
    tiny: Path,
    config: Qwen3VLConfig,
    engine: tuple[Qwen3VLEngine, Any],
    encoder: Qwen3VLEncoder,
    reference: Any,
    tokenizer: Any,
) -> None:
    case = _case(name, tiny)
    short, full = _prompt_ids(tokenizer, case, config)
    expected = _reference_generate(reference, full, case, config)
    got = _vllm_generate(engine, short, _vision_items(encoder, case))
    assert got.prompt_tokens == expected.prompt_tokens == len(full)
    assert got.tokens == expected.tokens
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=LOGPROB_ATOL)


@pytest.mark.integration
def test_deepstack_is_on_and_images_are_cached_by_their_hash(
    tiny: Path,
    config: Qwen3VLConfig,
    engine: tuple[Qwen3VLEngine, Any],
    encoder: Qwen3VLEncoder,
    tokenizer: Any,
) -> None:
    """Zeroing the DeepStack columns changes the tokens, so the real run's
    agreement with transformers needs them. The same zeroed rows sent under the real
    rows' content hash give the real run's output: vLLM keys its caches on the hash we
    pass, never on the tensor (the caller must make it a content hash)."""
    case = _case("one image", tiny)
    short, _ = _prompt_ids(tokenizer, case, config)
    [item] = _vision_items(encoder, case)
    zeroed_rows = item.rows.clone()
    zeroed_rows[:, config.vision.out_hidden_size :] = 0
    real = _vllm_generate(engine, short, [item])
    zeroed = VisionItem("image", zeroed_rows, item.grid_thw, "zeroed-" + item.uuid)
    without = _vllm_generate(engine, short, [zeroed])
    assert without.tokens != real.tokens
    assert max(abs(a - b) for a, b in zip(real.logprobs, without.logprobs, strict=True)) > 0.05
    under_real_hash = VisionItem("image", zeroed_rows, item.grid_thw, item.uuid)
    cached = _vllm_generate(engine, short, [under_real_hash])
    assert cached.tokens == real.tokens
    np.testing.assert_allclose(cached.logprobs, real.logprobs, atol=1e-6)
