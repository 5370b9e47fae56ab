"""`lorafleet export RUN|MODEL --format gguf --out FILE`: one merged GGUF file and an Ollama Modelfile beside it.

    lorafleet export price-20250101-120000 --format gguf --outtype q8_0 --out /models/price.gguf
    ollama create price -f /models/price.Modelfile

MODEL resolves as for `lorafleet quantize` (training/model_sources.py): a run is merged into its base in float32
first; a registry model, a model folder or a `builtin:` base is written as it is. The GGUF goes to a temporary
name beside FILE, is read back (header, every tensor) and renamed into place; the Modelfile (`FILE` with
`.Modelfile` for `.gguf`) names the file, the chat template in Ollama's template language and the stop tokens.
Neither file replaces an existing one unless --overwrite is given.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.gguf_export import OUTTYPES, GGUFExportError, write_gguf
from lorafleet.training.model_sources import resolve_source

FORMATS = ("gguf",)
CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
# Ollama templates are Go templates, not Jinja: the chat formats whose Jinja template is recognised, by marker.
OLLAMA_TEMPLATES = {"<|im_start|>": (CHATML, "<|im_end|>"), "<|start_header_id|>": (LLAMA3, "<|eot_id|>")}


@dataclass(frozen=True)
class ExportSummary:
    gguf: Path
    modelfile: Path
    size_bytes: int
    template: str  # "chatml", "llama3", or "from the GGUF" (Ollama reads tokenizer.chat_template itself)


def export_model(
    reference: str, out: Path, *, fmt: str = "gguf", outtype: str = "f16", overwrite: bool = False, storage=None
) -> ExportSummary:
    from lorafleet.model_loading import load_base_tokenizer

    if fmt not in FORMATS:
        raise GGUFExportError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    out = Path(out).expanduser().resolve()
    modelfile = out.with_suffix(".Modelfile") if out.suffix == ".gguf" else out.with_name(out.name + ".Modelfile")
    for target in (out, modelfile):
        if target.exists() and not overwrite:
            raise GGUFExportError(f"{target} already exists: pass --overwrite to replace it, or choose another --out")
        if target.exists() and not target.is_file():
            raise GGUFExportError(f"{target} exists and is not a regular file")
    source = resolve_source(reference, storage)
    tokenizer = load_base_tokenizer(source.folder)
    model = source.load()
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[export] writing {out.name} ({outtype})", file=sys.stderr, flush=True)
    _write_atomically(out, lambda path: _write_checked(model, tokenizer, path, outtype, out.stem))
    text, template = modelfile_text(out.name, tokenizer, reference)
    _write_atomically(modelfile, lambda path: path.write_text(text))
    return ExportSummary(out, modelfile, out.stat().st_size, template)


def _write_checked(model, tokenizer, path: Path, outtype: str, name: str) -> None:
    """Write the GGUF, then read it back: a file that does not parse, or lacks a tensor, is never renamed in."""
    import gguf

    write_gguf(model, tokenizer, path, outtype=outtype, name=name)
    reader = gguf.GGUFReader(str(path))
    # embeddings, 9 per layer, the final norm, and the LM head unless it is the embedding matrix
    expected = 9 * model.config.num_hidden_layers + 2 + (0 if model.config.tie_word_embeddings else 1)
    if len(reader.tensors) != expected:
        raise LorafleetError(f"{path}: read back {len(reader.tensors)} tensors, expected {expected}")


def _write_atomically(target: Path, write) -> None:
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        write(staging)
        with open(staging, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(staging, 0o644)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def modelfile_text(gguf_name: str, tokenizer, source: str) -> tuple[str, str]:
    """An Ollama Modelfile for the file, and which template it carries."""
    lines = [f"# lorafleet export of {source}: ollama create NAME -f <this file>", f"FROM ./{gguf_name}"]
    chat_template = tokenizer.chat_template or ""
    template, kind, stops = None, "from the GGUF", []
    for marker, (go_template, stop) in OLLAMA_TEMPLATES.items():
        if marker in chat_template:
            template, kind, stops = go_template, "chatml" if marker == "<|im_start|>" else "llama3", [stop]
            break
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF (tokenizer.chat_template)")
    eos = tokenizer.eos_token
    for stop in dict.fromkeys([*stops, *([eos] if eos else [])]):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n", kind
