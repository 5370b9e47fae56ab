"""The one way a base model is loaded, for training, eval, merge, compose and serving alike.

    model = load_base_model_weights("builtin:tiny-llama", dtype=torch.float32)

The policy: weights from safetensors only (a pickled `pytorch_model.bin` can run code when it is unpickled, so a
folder that has nothing else is refused, naming the file), the pinned `revision` when one is given, and
`trust_remote_code` off unless the job config turns it on for that model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.models import resolve_model

PICKLED_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.ckpt",
    "tf_model.h5",
    "flax_model.msgpack",
)


class UnsafeWeights(LorafleetError):
    """A model folder whose weights are not in safetensors."""

    exit_code = 2


def require_safetensors(folder: str | Path) -> None:
    """UnsafeWeights unless a local model folder holds safetensors weights (hub ids are checked by the loader)."""
    path = Path(folder)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickled = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
    found = f"it holds {', '.join(pickled)}" if pickled else "it holds no *.safetensors file"
    raise UnsafeWeights(
        f"{path}: weights are loaded from safetensors only, and {found}; convert the model to safetensors "
        "(transformers' save_pretrained writes it) on a machine you trust"
    )


def load_base_model_weights(
    reference: str, *, revision: str | None = None, trust_remote_code: bool = False, **kwargs: Any
):
    """`AutoModelForCausalLM` of a base reference (`builtin:`, a folder, a hub id) under the loading policy."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(reference)
    require_safetensors(source)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`", category=UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **_dense_quantized(source),
            **kwargs,
        )


def _dense_quantized(folder: str) -> dict[str, Any]:
    """A compressed-tensors folder (`lorafleet quantize`, llm-compressor) loads dense: its integers times their
    scales in ordinary Linear layers, which every consumer here can use (the CPU engine then re-packs them into
    int8 kernels: lorafleet.serving.quantized_base)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return {}
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") != "compressed-tensors":
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def load_base_tokenizer(reference: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model(reference), revision=revision, trust_remote_code=trust_remote_code
    )
