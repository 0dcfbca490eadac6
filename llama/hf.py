"""Hugging Face ``LlamaForCausalLM`` layout: names, rotary permutation and ``config.json``.

Meta's checkpoints rotate adjacent feature pairs (x[2i], x[2i+1]); Hugging Face's
Llama rotates the two halves of each head (x[i], x[i + d/2]). Converting weights
permutes the rows of wq and wk within each head so both give the same logits.
"""

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .model import ModelArgs

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# Buffers some Hugging Face checkpoints also store; recomputed, never loaded.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# safetensors dtype codes of the floating-point types a Llama checkpoint may hold.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def meta_to_hf_name(key: str) -> str:
    """Hugging Face name of Meta checkpoint key ``key`` (e.g. ``layers.0.attention.wq.weight``)."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    m = _META_LAYER.fullmatch(key)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for checkpoint key {key!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def hf_to_meta_name(key: str) -> str:
    """Meta checkpoint key of Hugging Face tensor ``key`` (e.g. ``model.layers.0.self_attn.q_proj.weight``)."""
    if key in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[key]
    m = _HF_LAYER.fullmatch(key)
    if not m or m.group(2) not in _HF_LAYER_NAMES:
        raise KeyError(f"unexpected tensor {key!r} in a Hugging Face Llama checkpoint")
    return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}"


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> Hugging Face (rotate-half) row order of a q/k projection."""
    rows, cols = w.shape
    # (heads * head_dim, cols) -> (heads, head_dim/2, 2, cols) -> swap pair and index axes
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`."""
    rows, cols = w.shape
    # (heads * head_dim, cols) -> (heads, 2, head_dim/2, cols) -> back to interleaved pairs
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_tensor_to_hf(key: str, t: torch.Tensor, args: ModelArgs) -> Tuple[str, torch.Tensor]:
    """(Hugging Face name, tensor in Hugging Face layout) of a full Meta tensor."""
    if key.endswith("attention.wq.weight"):
        t = permute_to_hf(t, args.n_heads)
    elif key.endswith("attention.wk.weight"):
        t = permute_to_hf(t, args.kv_heads)
    return meta_to_hf_name(key), t


def hf_tensor_to_meta(key: str, t: torch.Tensor, args: ModelArgs) -> Tuple[str, torch.Tensor]:
    """(Meta key, tensor in Meta layout) of a full Hugging Face tensor."""
    name = hf_to_meta_name(key)
    if name.endswith("attention.wq.weight"):
        t = permute_from_hf(t, args.n_heads)
    elif name.endswith("attention.wk.weight"):
        t = permute_from_hf(t, args.kv_heads)
    return name, t


def meta_to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """A full (unsharded) Meta state dict in Hugging Face names and layout."""
    return dict(meta_tensor_to_hf(k, v, args) for k, v in state.items() if k != "rope.freqs")


def hf_config(
    args: ModelArgs,
    dtype: torch.dtype = torch.float16,
    max_position_embeddings: int = 4096,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> dict:
    """``config.json`` for ``LlamaForCausalLM`` with the same architecture as ``args``."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": args.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        # transformers < 5 reads torch_dtype, >= 5 reads dtype
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def read_hf_config(path: Union[str, Path]) -> dict:
    """The raw ``config.json`` at ``path``, with a clear error when missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory must contain config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def args_from_hf_config(config: dict, source: str = "config.json", **overrides) -> ModelArgs:
    """``ModelArgs`` for a Hugging Face ``config.json`` (Llama 2 architecture only).

    ``overrides`` set the fields config.json does not hold (e.g. ``max_seq_len``).
    """
    if config.get("model_type") != "llama":
        raise ValueError(f"{source} has model_type={config.get('model_type')!r}; only 'llama' is supported")
    if config.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tied input/output embeddings are not a Llama 2 layout")
    rope = config.get("rope_parameters") or {}
    if (config.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None) or rope.get(
        "rope_type", "default"
    ) != "default":
        raise ValueError(f"{source}: RoPE scaling (Llama 3.1 style) is not supported by Llama 2 checkpoints")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source} has hidden_act={config['hidden_act']!r}; Llama uses 'silu'")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{source}: attention or MLP biases are not part of the Llama 2 architecture")
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size")
               if k not in config]
    if missing:
        raise ValueError(f"{source} lacks {missing}; is it a LlamaForCausalLM config?")
    dim, heads, hidden = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    if config.get("head_dim") not in (None, dim // heads) or dim % heads:
        raise ValueError(
            f"{source} has head_dim={config.get('head_dim')} with hidden_size={dim} and "
            f"num_attention_heads={heads}; Llama 2 needs head_dim = hidden_size / num_attention_heads"
        )
    multiple_of, ffn_dim_multiplier = _ffn_params(dim, hidden)
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        **overrides,
    )


def meta_params(args: ModelArgs) -> dict:
    """``params.json`` contents (Meta's keys) for the architecture ``args``; absent optional keys left out."""
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
    }
    return {k: v for k, v in params.items() if v is not None}


def _ffn_params(dim: int, hidden: int) -> Tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) giving SwiGLU size ``hidden``; Meta's own values when they fit."""
    for multiple_of, multiplier in ((256, None), (4096, 1.3), (256, 1.3), (1024, None)):
        if ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim == hidden:
            return multiple_of, multiplier
    base = int(2 * (4 * dim) / 3)
    # Rounding up to a multiple of `hidden` lands on `hidden` from anything in (0, hidden].
    return hidden, (None if base <= hidden else hidden / base)
