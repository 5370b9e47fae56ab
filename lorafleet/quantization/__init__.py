"""Post-training quantization shared by `lorafleet quantize`, `lorafleet eval --compare` and the CPU engine.

methods.py: the methods (int8, int4, gptq-w4a16, w8a8) and what each stores; weights.py: round-to-nearest and
GPTQ on one weight matrix; checkpoint.py: the compressed-tensors folder vLLM loads natively; int8_linear.py: the
CPU engine's int8 matmul (per-token int8 activations) for any of them.
"""
