"""`serving.vllm`: the rendered `vllm serve` argv, its environment, and the config rules vLLM enforces.

Flags were checked against vLLM 0.33.0's source (see serving/vllm.py): one `--lora-modules` followed by every
`name=path` (the option is nargs="+"; a repeated flag keeps only its last values), `--max-lora-rank` among
1, 8, 16, 32, 64, 128, 256, 320, 512, `--max-cpu-loras >= --max-loras`, runtime loading behind
VLLM_ALLOW_RUNTIME_LORA_UPDATING.
"""

from __future__ import annotations

import json
import shlex

import pytest

from lorafleet.errors import ConfigError
from lorafleet.serving.config import ServingConfig, build_serving_config
from lorafleet.serving.vllm import VLLM_VERSION, render_vllm_command, vllm_environment
from tests.helpers import run_cli

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def test_targets_vllm_0_33():
    assert VLLM_VERSION == "0.33.0"


def test_minimal_command():
    argv = render_vllm_command(ServingConfig(engine="vllm", base=LLAMA))
    assert argv == [
        "vllm", "serve", LLAMA, "--host", "127.0.0.1", "--port", "8000", "--enable-lora",
        "--max-loras", "4", "--max-lora-rank", "16",
    ]  # fmt: skip


def test_full_command_in_documented_order():
    config = ServingConfig(
        engine="vllm",
        base=LLAMA,
        served_model_name="llama-8b",
        adapters={"support": "/adapters/support/v2", "pricing": "/adapters/pricing/v3"},
        host="0.0.0.0",
        port=9000,
        max_loras=8,
        max_lora_rank=64,
        max_cpu_loras=32,
        max_model_len=8192,
        dtype="bfloat16",
        vllm_args=["--gpu-memory-utilization", "0.9"],
    )
    assert render_vllm_command(config) == [
        "vllm", "serve", LLAMA, "--host", "0.0.0.0", "--port", "9000", "--enable-lora",
        "--lora-modules", "pricing=/adapters/pricing/v3", "support=/adapters/support/v2",
        "--max-loras", "8", "--max-lora-rank", "64", "--max-cpu-loras", "32",
        "--served-model-name", "llama-8b", "--max-model-len", "8192", "--dtype", "bfloat16",
        "--gpu-memory-utilization", "0.9",
    ]  # fmt: skip


def test_lora_modules_is_one_flag_and_json_when_the_path_has_a_comma():
    argv = render_vllm_command(ServingConfig(base=LLAMA, adapters={"a": "/x/a", "b": "/odd,path/b"}))
    assert argv.count("--lora-modules") == 1
    start = argv.index("--lora-modules") + 1
    assert argv[start] == "a=/x/a"
    assert json.loads(argv[start + 1]) == {"name": "b", "path": "/odd,path/b"}
    assert argv[start + 2] == "--max-loras"


def test_builtin_base_is_served_under_its_reference(tiny_model_dir):
    argv = render_vllm_command(ServingConfig(base="builtin:tiny-llama"))
    assert argv[2] == tiny_model_dir
    assert argv[argv.index("--served-model-name") + 1] == "builtin:tiny-llama"


def test_environment():
    assert vllm_environment(ServingConfig(base=LLAMA)) == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert vllm_environment(ServingConfig(base=LLAMA, runtime_lora_updating=False)) == {}
    config = ServingConfig(base=LLAMA, api_key="s3cret")
    assert vllm_environment(config)["VLLM_API_KEY"] == "s3cret"
    assert "s3cret" not in " ".join(render_vllm_command(config)), "the key never shows in argv (ps, logs)"


@pytest.mark.parametrize("rank", [1, 8, 16, 32, 64, 128, 256, 320, 512])
def test_max_lora_rank_accepts_vllm_choices(rank):
    assert render_vllm_command(ServingConfig(base=LLAMA, max_lora_rank=rank))[-1] == str(rank)


@pytest.mark.parametrize("rank", [0, 2, 4, 12, 100, 1024])
def test_max_lora_rank_refuses_other_values(rank):
    with pytest.raises(ValueError, match="not a rank vLLM accepts"):
        ServingConfig(base=LLAMA, max_lora_rank=rank)


def test_max_cpu_loras_at_least_max_loras():
    assert ServingConfig(base=LLAMA, max_loras=4, max_cpu_loras=4).max_cpu_loras == 4
    with pytest.raises(ValueError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        ServingConfig(base=LLAMA, max_loras=4, max_cpu_loras=2)


@pytest.mark.parametrize("name", ["Upper", "../up", "a/b", "", "-dash", "x" * 64, "a..b"])
def test_adapter_names_are_checked(name):
    with pytest.raises(ValueError, match="invalid adapter name"):
        ServingConfig(base=LLAMA, adapters={name: "/x"})


def test_yaml_with_flag_overrides_and_located_errors(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(f"engine: vllm\nbase: {LLAMA}\nmax_loras: 2\nadapters:\n  a: /x/a\n")
    config = build_serving_config(path, {"max_loras": 6, "adapters": {"b": "/x/b"}, "port": None})
    assert (config.max_loras, config.port, config.adapters) == (6, 8000, {"a": "/x/a", "b": "/x/b"})
    path.write_text(f"base: {LLAMA}\nmax_lora_rank: 12\nmax_lorass: 2\n")
    with pytest.raises(ConfigError) as error:
        build_serving_config(path, {})
    message = str(error.value)
    assert f"{path}:2 max_lora_rank" in message and f"{path}:3 max_lorass: unknown key" in message


def test_cli_print_command(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(f"engine: vllm\nbase: {LLAMA}\nadapters:\n  pricing: /adapters/pricing/v3\n")
    result = run_cli("serve", "--config", str(path), "--max-loras", "2", "--port", "9001", "--print-command")
    assert result.returncode == 0, result.stderr
    expected = build_serving_config(path, {"max_loras": 2, "port": 9001})
    assert result.stdout.strip() == shlex.join(render_vllm_command(expected))
    assert result.stdout.count("\n") == 1


def test_without_vllm_anywhere_the_error_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    """No --vllm-python, no $LORAFLEET_VLLM_PYTHON, no `vllm` on PATH, no .venv-vllm beside this venv."""
    import sys

    from lorafleet.serving.vllm import VllmNotInstalled, vllm_launcher

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LORAFLEET_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / ".venv"))
    with pytest.raises(VllmNotInstalled) as refused:
        vllm_launcher(ServingConfig(engine="vllm", base=LLAMA))
    message = str(refused.value)
    assert "make vllm" in message and f"pip install vllm=={VLLM_VERSION}" in message and "--engine cpu" in message
    assert str(tmp_path / ".venv-vllm" / "bin" / "python") in message


def test_the_launcher_found_runs_the_rendered_argv(tmp_path, monkeypatch):
    """`vllm` on PATH runs the argv as rendered; a Python (flag, env, .venv-vllm) runs vLLM's module with the base
    as --model and every other flag unchanged."""
    from lorafleet.serving.vllm import render_vllm_command, vllm_process_command

    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    config = ServingConfig(engine="vllm", base=LLAMA, adapters={"a": "/adapters/a"}, vllm_python=str(python))
    rendered = render_vllm_command(config)
    assert vllm_process_command(config) == [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", rendered[2], *rendered[3:]
    ]  # fmt: skip
    vllm = tmp_path / "bin" / "vllm"
    vllm.parent.mkdir()
    vllm.write_text("#!/bin/sh\n")
    vllm.chmod(0o755)
    monkeypatch.setenv("PATH", str(vllm.parent))
    monkeypatch.delenv("LORAFLEET_VLLM_PYTHON", raising=False)
    assert vllm_process_command(config.model_copy(update={"vllm_python": None})) == rendered


def test_cli_rejects_bad_rank_with_exit_2():
    result = run_cli("serve", "--engine", "vllm", "--base", LLAMA, "--max-lora-rank", "12", "--print-command")
    assert result.returncode == 2 and "not a rank vLLM accepts" in result.stderr


def test_registry_adapters_bring_their_base_unless_one_is_given(tiny_model_dir, tmp_path):
    """Without --base, the base is the one every adapter's manifest names; adapters on different bases are refused."""
    import json

    from lorafleet.registry import publish_adapter
    from lorafleet.serving.testing import make_adapter

    storage = str(tmp_path / "storage")
    for name, seed in (("price", 1), ("support", 2)):
        publish_adapter(storage, name, make_adapter(tiny_model_dir, tmp_path / name, "lora", seed=seed))
    argv = ("serve", "--engine", "vllm", "--print-command", "--storage", storage, "--adapters", "price,support")
    shown = run_cli(*argv)
    assert shown.returncode == 0, shown.stderr
    assert shlex.split(shown.stdout)[2] == tiny_model_dir
    assert run_cli(*argv, "--base", "org/other-model").stdout.split()[2] == "org/other-model"

    other = tmp_path / "other"
    make_adapter(tiny_model_dir, other, "lora", seed=3)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other-model"}))
    publish_adapter(storage, "sql", other)
    mixed = run_cli("serve", "--engine", "vllm", "--print-command", "--storage", storage, "--adapters", "price,sql")
    assert mixed.returncode == 2
    assert "trained on different bases" in mixed.stderr and "org/other-model (sql)" in mixed.stderr


def test_merged_model_from_the_registry_is_served_as_the_base(tiny_model_dir, tmp_path):
    storage = str(tmp_path / "storage")
    published = run_cli("publish", tiny_model_dir, "--name", "tiny-merged", "--merged", "--storage", storage)
    assert published.returncode == 0, published.stderr
    argv = ("serve", "--engine", "vllm", "--print-command", "--storage", storage)
    shown = run_cli(*argv, "--base", "registry:tiny-merged@v1")
    assert shown.returncode == 0, shown.stderr
    command = shlex.split(shown.stdout)
    assert command[2] == str(tmp_path / "storage" / "models" / "tiny-merged" / "v1")
    assert command[command.index("--served-model-name") + 1] == "tiny-merged"
    missing = run_cli(*argv, "--base", "registry:tiny-merged@v7")
    assert missing.returncode == 2 and "base registry:tiny-merged@v7" in missing.stderr
