"""Model FLOPs of a LoRA training step, and this machine's own matmul rate (fp32 or bf16): the two halves of MFU.

    from model_flops import matmul_rate, useful_flops_per_token    # bench/train_throughput.py reports MFU with them
    mfu = tokens_per_s * useful_flops_per_token(job) / matmul_rate(threads)

Useful FLOPs are what the loss and the LoRA gradients need, counted from the model's shapes: forward of every
linear layer and attention, backward to the inputs of the frozen layers, forward and both backward matmuls of
the LoRA factors, and the LM head at the labelled positions only. Work beyond that (logits nobody reads,
padding) does not count, so two arms' MFU ratio is their useful-throughput ratio.
"""

from __future__ import annotations

MATMUL_SIZE = 2048  # the machine's own matmul rate: a square matmul of this size, at the arms' threads


def matmul_rate(threads: int, precision: str = "fp32") -> float:
    """FLOP/s of one square matmul in `precision` (fp32, bf16) at `threads` torch threads: the best of 5."""
    import torch

    from lorafleet.precision import TORCH_DTYPES, matmul_gflops

    torch.set_num_threads(threads)
    return matmul_gflops(TORCH_DTYPES[precision], MATMUL_SIZE) * 1e9


def useful_flops_per_token(job) -> float:
    """The FLOPs a LoRA step needs per training token, averaged over the job's examples (see the docstring).

    Llama-family shapes: per layer q/o (hidden x heads·head_dim), k/v (hidden x kv_heads·head_dim), gate/up/down
    (hidden x intermediate); a matmul of m x n over t tokens is 2·m·n·t FLOPs forward, as much again for the
    gradient of its input, and (LoRA factors only) again for the gradient of its weight. Layers below the lowest
    adapted one (`adapter.top_layers`) need their forward only.
    """
    from transformers import AutoConfig, AutoTokenizer

    from lorafleet.models import resolve_model
    from lorafleet.training.data import build_datasets
    from lorafleet.training.labelled_logits import IGNORE_INDEX

    model_dir = resolve_model(job.model.name_or_path)
    config = AutoConfig.from_pretrained(model_dir)
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden)] + [(hidden, inter)] * 2
    shapes.append((inter, hidden))
    frozen = sum(m * n for m, n in shapes)
    lora = job.adapter.r * sum(m + n for m, n in shapes)
    adapted = job.adapter.top_layers or config.num_hidden_layers  # below them: forward only
    below, flops = config.num_hidden_layers - adapted, 0.0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = build_datasets(job.data, tokenizer, seed=job.training.seed).train.examples
    total_tokens = 0
    for example in examples:
        length = len(example["input_ids"])
        labelled = sum(label != IGNORE_INDEX for label in example["labels"][1:])
        forward = 2 * length * frozen + 2 * q_out * length * (length + 1)  # QK^T and AV over the causal half
        trained = 2 * forward + 2 * length * 3 * lora  # + input gradients; LoRA: forward and both gradients
        flops += below * forward + adapted * trained + 2 * 2 * hidden * vocab * labelled
        total_tokens += length
    return flops / total_tokens
