"""A Llama-architecture model as one GGUF file (llama.cpp, Ollama), written with the `gguf` library.

    write_gguf(model, tokenizer, Path("price.gguf"), outtype="q8_0", name="price")

What the file holds, under llama.cpp's names (the layout its own converter writes, which transformers' GGUF
loader and llama.cpp read back):
- metadata: `general.*` (architecture llama, name, file type), `llama.*` (context length, widths, heads, rope
  base, RMS-norm epsilon, vocabulary size);
- the tokenizer: a byte-level BPE's tokens by id, their types (normal, control for special tokens, user-defined
  for other added ones), its merges, the bos/eos/unk/pad ids and the chat template (`tokenizer.*`);
- the tensors: 2-D weights as f16 or q8_0 (blocks of 32 values with one f16 scale), norms as f32. The q and k
  projections are stored with each head's rotary halves interleaved, as llama.cpp's rope expects (the loader
  undoes it). A tied LM head is not written (`output.weight` absent means tied).
Only what can be written faithfully is: other architectures, biases, rope scaling and non-BPE tokenizers are
refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError

OUTTYPES = ("f16", "q8_0")
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
Q8_0_BLOCK = 32


class GGUFExportError(LorafleetError):
    """A model that cannot be written as GGUF faithfully."""

    exit_code = 2


def write_gguf(model: Any, tokenizer: Any, path: Path, *, outtype: str = "f16", name: str = "model") -> None:
    """Write `model` (a LlamaForCausalLM) and its `tokenizer` to `path` (a new file)."""
    import gguf

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    config = model.config
    _refuse_unwritable(config, model)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    for tensor_name, tensor in _gguf_tensors(model):
        _add_tensor(writer, tensor_name, tensor, outtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _refuse_unwritable(config: Any, model: Any) -> None:
    if config.model_type != "llama":
        raise GGUFExportError(f"GGUF export writes Llama-architecture models; this one is {config.model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("GGUF export: models with attention or MLP biases are not supported")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    if model.get_input_embeddings().weight.shape[0] != config.vocab_size:
        raise GGUFExportError("GGUF export: the embedding rows differ from config.vocab_size")


def _add_hyperparameters(writer: Any, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = backend["model"]
    pre = backend.get("pre_tokenizer") or {}
    if bpe.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise GGUFExportError("GGUF export writes byte-level BPE tokenizers (GPT-2 style); this one is not")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(by_id)} tokens, more than the model's {vocab_size} rows")
    added = {entry["id"]: entry for entry in backend.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # rows the model has and the tokenizer never produces (llama.cpp's padding)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        entry = added.get(index)
        types.append(
            gguf.TokenType.NORMAL
            if entry is None
            else gguf.TokenType.CONTROL
            if entry.get("special")
            else gguf.TokenType.USER_DEFINED
        )
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the split regex ByteLevel(use_regex=True) applies
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # readers rebuild merges from the vocabulary by score when the file lists none: no token outranks another
        writer.add_token_scores([0.0] * len(tokens))
    for kind, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        token = getattr(tokenizer, kind, None)
        if token is not None:
            add(tokenizer.convert_tokens_to_ids(token))
    writer.add_add_bos_token(bool(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_tensors(model: Any):
    """(llama.cpp name, float32 tensor) for every weight, q and k with their rotary halves interleaved."""
    config = model.config
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            tensor = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                tensor = _interleave_rotary(tensor, config.num_attention_heads)
            elif gguf_name == "attn_k":
                tensor = _interleave_rotary(tensor, config.num_key_value_heads)
            yield f"blk.{layer}.{gguf_name}.weight", tensor
    yield "output_norm.weight", state["model.norm.weight"]
    if not config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"]


def _interleave_rotary(weight: Any, heads: int) -> Any:
    """HF keeps each head's rotary pairs as two halves; llama.cpp's rope takes them as adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensor(writer: Any, name: str, tensor: Any, outtype: str) -> None:
    import gguf
    import numpy as np

    data = tensor.detach().float().cpu().numpy()
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif outtype == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))
