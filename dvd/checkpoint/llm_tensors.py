"""The tensors an InternVL3.5 LLM needs, with their shapes, worked out from its config alone.

Names are a plain CausalLM's (what `names.llm_weight_name` maps stored names to):
`model.embed_tokens.weight`, `model.layers.{i}.*`, `model.norm.weight`, `lm_head.weight`.

Every family has the embedding table, the final norm and, unless the head is tied to the
embedding table, `lm_head.weight`. Layers are spelled out for the families InternVL3.5 and
its predecessors ship (Qwen3 for 1B-38B, Qwen3-MoE for 30B-A3B and 241B-A28B, Qwen2 and
Llama for InternVL2.5/3); for any other family only the tensors every family has are
checked before start, and vLLM's own load report (language_server/vllm_plugin.py) is the
guard for the rest.

Missing config keys take the defaults of transformers' config class for that model_type
(e.g. Qwen3's head_dim 128), which is how vLLM, reading the same config.json through
transformers, will fill them.
"""

from __future__ import annotations

import re
from typing import Any

Shapes = dict[str, tuple[int, ...]]

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"


def resolve_text_config(llm_config: dict[str, Any]) -> Any:
    """transformers' config object for the LLM (defaults filled the way transformers does)."""
    from transformers import AutoConfig

    settings = {k: v for k, v in llm_config.items() if k not in ("model_type", "architectures")}
    return AutoConfig.for_model(llm_config["model_type"], **settings)


def expected_llm_tensors(llm_config: dict[str, Any], tied: bool) -> tuple[Shapes, bool]:
    """(name -> shape, complete): complete is False when only the common tensors are known."""
    text = resolve_text_config(llm_config)
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    shapes: Shapes = {EMBED: (vocab, hidden), FINAL_NORM: (hidden,)}
    if not tied:
        shapes[HEAD] = (vocab, hidden)
    layer = _LAYER_OF_FAMILY.get(llm_config["model_type"])
    if layer is None:
        return shapes, False
    for i in range(int(text.num_hidden_layers)):
        for suffix, shape in layer(text, i).items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    return shapes, True


_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_experts(shapes: Shapes) -> Shapes:
    """The same MoE tensors as Qwen3-VL-MoE releases store them: per layer, all experts in
    two 3-D tensors, `mlp.experts.gate_up_proj` (experts, hidden, 2 x moe_intermediate; gate
    columns first) and `mlp.experts.down_proj` (experts, moe_intermediate, hidden), i.e.
    transposed against nn.Linear (vLLM 0.32's qwen3_vl_moe.py loads them with
    is_fused_checkpoint_transposed=True; transformers 5 transposes them on load)."""
    out: Shapes = {}
    experts: dict[int, dict[str, tuple[int, ...]]] = {}
    counts: dict[int, set[int]] = {}
    for name, shape in shapes.items():
        match = _EXPERT.match(name)
        if match is None:
            out[name] = shape
            continue
        layer, expert, part = int(match.group(1)), int(match.group(2)), match.group(3)
        experts.setdefault(layer, {})[part] = shape
        counts.setdefault(layer, set()).add(expert)
    for layer, parts in experts.items():
        count = len(counts[layer])
        intermediate, hidden = parts["gate"]
        prefix = f"model.layers.{layer}.mlp.experts."
        out[prefix + "gate_up_proj"] = (count, hidden, 2 * intermediate)
        out[prefix + "down_proj"] = (count, intermediate, hidden)
    return out


def _head_dim(text: Any) -> int:
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def _attention(text: Any, *, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> Shapes:
    hidden, head_dim = int(text.hidden_size), _head_dim(text)
    q = int(text.num_attention_heads) * head_dim
    kv = int(text.num_key_value_heads) * head_dim
    shapes: Shapes = {
        "self_attn.q_proj.weight": (q, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, q),
    }
    if qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,)})
        shapes["self_attn.v_proj.bias"] = (kv,)
    if o_bias:
        shapes["self_attn.o_proj.bias"] = (hidden,)
    if qk_norm:
        shapes.update(
            {"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)}
        )
    return shapes


def _mlp(prefix: str, hidden: int, intermediate: int, bias: bool = False) -> Shapes:
    shapes: Shapes = {
        f"{prefix}gate_proj.weight": (intermediate, hidden),
        f"{prefix}up_proj.weight": (intermediate, hidden),
        f"{prefix}down_proj.weight": (hidden, intermediate),
    }
    if bias:
        shapes.update(
            {f"{prefix}gate_proj.bias": (intermediate,), f"{prefix}up_proj.bias": (intermediate,)}
        )
        shapes[f"{prefix}down_proj.bias"] = (hidden,)
    return shapes


def _norms(hidden: int) -> Shapes:
    return {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}


def _qwen2_layer(text: Any, index: int) -> Shapes:
    # Qwen2 has biases on q/k/v and none on o_proj, whatever the config says.
    hidden = int(text.hidden_size)
    attention = _attention(text, qkv_bias=True, o_bias=False, qk_norm=False)
    return {**attention, **_mlp("mlp.", hidden, int(text.intermediate_size)), **_norms(hidden)}


def _qwen3_layer(text: Any, index: int) -> Shapes:
    hidden, bias = int(text.hidden_size), bool(text.attention_bias)
    attention = _attention(text, qkv_bias=bias, o_bias=bias, qk_norm=True)
    return {**attention, **_mlp("mlp.", hidden, int(text.intermediate_size)), **_norms(hidden)}


def _llama_layer(text: Any, index: int) -> Shapes:
    hidden, bias = int(text.hidden_size), bool(text.attention_bias)
    attention = _attention(text, qkv_bias=bias, o_bias=bias, qk_norm=False)
    mlp = _mlp("mlp.", hidden, int(text.intermediate_size), bool(getattr(text, "mlp_bias", False)))
    return {**attention, **mlp, **_norms(hidden)}


def _qwen3_moe_layer(text: Any, index: int) -> Shapes:
    """A sparse layer has a router (`mlp.gate`) and one MLP per expert, stored one by one."""
    hidden, bias = int(text.hidden_size), bool(text.attention_bias)
    shapes = {**_attention(text, qkv_bias=bias, o_bias=bias, qk_norm=True), **_norms(hidden)}
    experts = int(text.num_experts)
    sparse = (
        index not in (text.mlp_only_layers or [])
        and experts > 0
        and (index + 1) % int(text.decoder_sparse_step) == 0
    )
    if not sparse:
        return {**shapes, **_mlp("mlp.", hidden, int(text.intermediate_size))}
    shapes["mlp.gate.weight"] = (experts, hidden)
    for expert in range(experts):
        shapes.update(_mlp(f"mlp.experts.{expert}.", hidden, int(text.moe_intermediate_size)))
    return shapes


_LAYER_OF_FAMILY = {
    "qwen2": _qwen2_layer,
    "qwen3": _qwen3_layer,
    "llama": _llama_layer,
    "qwen3_moe": _qwen3_moe_layer,
}
