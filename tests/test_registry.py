"""The adapter registry: atomic versioned publish, aliases with a promotion gate, verify, the serving contract,
weighted composition. Adapters are real PEFT LoRA adapters of the tiny random Llama (nonzero B weights).

    .venv/bin/python -m pytest tests/test_registry.py -q
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from lorafleet.config import JobConfig
from lorafleet.registry import (
    InvalidReference,
    NotFound,
    PromotionRefused,
    Reference,
    Registry,
    ServingProfile,
    check_adapter_against_profile,
    compose_adapters,
    list_entries,
    parse_reference,
    promote,
    publish_adapter,
    publish_run,
    read_aliases,
    resolve,
    unpublish,
    verify,
)
from lorafleet.runs import RunFolder, RunRecord
from tests.helpers import run_cli
from tests.registry_worker import ForkServer

BASE = "builtin:tiny-llama"
ADAPTER_SPECS = {
    "a": {"seed": 1, "r": 8},
    "b": {"seed": 2, "r": 8},
    "r64": {"seed": 3, "r": 64},
    "saves_lm_head": {"seed": 4, "r": 8, "modules_to_save": ["lm_head"]},
    "other_base": {"seed": 5, "r": 8, "base": "meta-llama/Llama-3.1-8B"},
    "big": {"seed": 6, "r": 1024, "target_modules": "all-linear"},  # ~8 MB: a publish window worth killing in
}


def _make_adapter(out: Path, model_dir: str, *, seed: int, base: str = BASE, **lora) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base  # as training's export writes it
    config_path.write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {key: _make_adapter(root / key, tiny_model_dir, **dict(spec)) for key, spec in ADAPTER_SPECS.items()}


@pytest.fixture
def storage(tmp_path) -> str:
    return str(tmp_path / "storage")


def make_run(storage: str, run_id: str, adapter: Path, metrics: dict | None = None) -> Path:
    """A run folder as training leaves it: adapter/, config.yaml, run.json, report/eval.json."""
    run_dir = Path(storage) / "runs" / run_id
    shutil.copytree(adapter, run_dir / "adapter")
    folder = RunFolder(str(run_dir))
    folder.write_config(
        JobConfig(name="demo", model={"name_or_path": BASE, "revision": "main"}, data={"train": "builtin:price"})
    )
    folder.write_record(
        RunRecord(run_id=run_id, status="succeeded", config_hash="c0ffee", global_step=5, data={"data_hash": "da7a"})
    )
    if metrics is not None:
        (run_dir / "report").mkdir()
        (run_dir / "report" / "eval.json").write_text(json.dumps({"base": {"mae": 99.0}, "finetuned": metrics}))
    return run_dir


def logits(model_dir: str, adapter_path: Path | None = None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, str(adapter_path))  # plain PEFT, nothing of ours
    with torch.no_grad():
        return model.eval()(torch.tensor([[5, 17, 42, 99, 7, 64]])).logits


# -- names and references ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pricing", ("pricing", "latest")),
        ("pricing@v3", ("pricing", "v3")),
        ("pricing@prod", ("pricing", "prod")),
        ("a.b_c-1@latest", ("a.b_c-1", "latest")),
    ],
)
def test_parse_reference_accepts(text, expected):
    assert tuple(parse_reference(text)) == expected


@pytest.mark.parametrize("text", ["../x", "/abs", "", "UPPER", "a/b", "x" * 64, ".hidden", "ok@", "ok@v0", "ok@../x"])
def test_parse_reference_refuses(text):
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_bad_names_refused_by_the_cli_with_exit_2(storage, adapters):
    run_dir = make_run(storage, "run-1", adapters["a"])
    for bad in ("../x", "/abs", "", "UPPER", "a/b"):
        with pytest.raises(InvalidReference, match="invalid registry name"):
            publish_adapter(storage, bad, adapters["a"])
    result = run_cli("publish", str(run_dir), "--name", "../x", "--storage", storage)
    assert result.returncode == 2 and "invalid registry name '../x'" in result.stderr
    assert not (Path(storage) / "adapters").exists() and not (Path(storage) / "x").exists()
    show = run_cli("registry", "show", "../x", "--storage", storage)
    assert show.returncode == 2 and "invalid registry name" in show.stderr


# -- publish, list, show, load -------------------------------------------------------------------------------


def test_one_corrupt_aliases_file_does_not_hide_the_other_names(storage, adapters):
    for name in ("healthy", "broken"):
        publish_adapter(storage, name, adapters["a"])
    aliases = Path(storage) / "adapters" / "broken" / "aliases.json"
    aliases.write_text('{"aliases": {"prod": ')  # torn by hand
    listed = run_cli("registry", "list", "--storage", storage)
    assert listed.returncode == 1, listed.stderr
    assert "adapters/healthy\tv1\tlatest=v1" in listed.stdout
    assert "adapters/broken\tv1\t(aliases unreadable)" in listed.stdout
    assert f"error: adapters/broken: {aliases} is corrupt" in listed.stderr and "Traceback" not in listed.stderr
    as_json = json.loads(run_cli("registry", "list", "--json", "--storage", storage).stdout)
    assert [(e["name"], "error" in e) for e in as_json] == [("broken", True), ("healthy", False)]


def test_publish_list_show_and_plain_peft_load(storage, adapters, tiny_model_dir):
    first = run_cli(
        "publish",
        str(make_run(storage, "run-1", adapters["a"], {"mae": 12.5})),
        "--name",
        "pricing",
        "--storage",
        storage,
    )
    assert first.returncode == 0, first.stderr
    assert "adapters/pricing@v1" in first.stdout
    make_run(storage, "run-2", adapters["b"], {"mae": 11.0})
    second = publish_run(storage, "run-2", name="pricing")  # a run id under <storage>/runs/
    assert second.version == "v2"
    assert read_aliases_latest(storage, "pricing") == "v2"

    listed = run_cli("registry", "list", "--storage", storage)
    assert listed.returncode == 0 and "adapters/pricing\tv1 v2\tlatest=v2" in listed.stdout

    show = run_cli("registry", "show", "pricing@v1", "--storage", storage)
    assert show.returncode == 0, show.stderr
    manifest = json.loads(show.stdout)
    assert manifest["name"] == "pricing" and manifest["version"] == "v1"
    assert manifest["base_model"] == BASE and manifest["base_model_revision"] == "main"
    assert (manifest["method"], manifest["rank"], manifest["target_modules"]) == ("lora", 8, ["q_proj", "v_proj"])
    assert (manifest["run_id"], manifest["config_hash"], manifest["data_hash"]) == ("run-1", "c0ffee", "da7a")
    assert manifest["metrics"]["mae"] == 12.5 and manifest["metrics"]["base.mae"] == 99.0
    assert manifest["base_fingerprint"] and manifest["created_at"]
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert [event["event"] for event in manifest["history"]] == ["trained", "published"]

    latest = resolve(storage, "pricing")
    assert latest.version == "v2" and latest.path == Path(storage).resolve() / "adapters/pricing/v2"
    assert latest.path.stat().st_mode & 0o005 == 0o005  # readable by a serving pod running as another user
    assert not logits(tiny_model_dir, latest.path).allclose(logits(tiny_model_dir))
    assert logits(tiny_model_dir, latest.path).allclose(logits(tiny_model_dir, adapters["b"]))
    with pytest.raises(NotFound):
        resolve(storage, "pricing@v9")
    with pytest.raises(NotFound, match="no alias 'prod'"):
        resolve(storage, "pricing@prod")


def read_aliases_latest(storage: str, name: str) -> str:
    stored = json.loads((Registry.open(storage).name_dir(name) / "aliases.json").read_text())
    return stored["aliases"]["latest"]


def test_publish_merged_model(storage, tiny_model_dir):
    published = run_cli("publish", tiny_model_dir, "--name", "tiny-merged", "--merged", "--storage", storage)
    assert published.returncode == 0, published.stderr
    found = resolve(storage, "tiny-merged@latest", kind="models")
    assert found.manifest.kind == "model" and "config.json" in found.manifest.files
    assert (found.path / "config.json").is_file()
    assert [e.kind for e in list_entries(storage)] == ["models"]
    assert verify(storage).ok


# -- crash safety and concurrency ----------------------------------------------------------------------------


@pytest.fixture
def fork_server():
    server = ForkServer()
    yield server
    server.close()


def test_sigkill_during_publish_never_leaves_a_partial_version(storage, adapters, fork_server):
    rng = random.Random(1234)
    durations = []
    for _ in range(2):  # uninterrupted publishes measure the window the kills aim at
        fork_server.send("one", storage, "crashy", adapters["big"])
        durations.append(float(fork_server.expect("done")[2]))
    window = max(durations) * 1.2
    finished, killed = 2, 0
    for _ in range(30):
        fork_server.send("one", storage, "crashy", adapters["big"])
        pid = int(fork_server.expect("started")[0])
        time.sleep(rng.uniform(0, window))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # finished and reaped already
        code = int(fork_server.expect("done")[1])
        finished, killed = (finished + 1, killed) if code == 0 else (finished, killed + 1)
    assert killed >= 5 and finished >= 3, f"kills should land inside the {window:.3f}s publish window: {killed=}"

    report = verify(storage)
    assert report.ok, [str(p) for p in report.problems]
    versions = [int(v[1:]) for v in list_entries(storage, "crashy")[0].versions]
    assert finished <= len(versions) <= 32
    assert versions == sorted(set(versions))
    expected_size = (adapters["big"] / "adapter_model.safetensors").stat().st_size
    for version in versions:
        found = resolve(storage, f"crashy@v{version}")
        assert found.manifest.version == f"v{version}"
        assert (found.path / "adapter_model.safetensors").stat().st_size == expected_size
    listed = run_cli("registry", "list", "crashy", "--storage", storage).stdout
    assert ".staging" not in listed and "tmp" not in listed
    assert read_aliases(Registry.open(storage), "crashy").aliases["latest"] == f"v{max(versions)}"
    after = publish_adapter(storage, "crashy", adapters["a"])  # leftovers of killed publishes do not get in the way
    assert after.version == f"v{max(versions) + 1}" == read_aliases_latest(storage, "crashy")
    assert run_cli("registry", "verify", "--storage", storage).returncode == 0


def test_concurrent_publishes_get_distinct_versions(storage, adapters, fork_server):
    fork_server.send("many", 8, storage, "busy", adapters["a"])  # 8 processes released at the same instant
    codes = [int(fork_server.expect("done")[1]) for _ in range(8)]
    assert codes == [0] * 8
    assert list_entries(storage, "busy")[0].versions == [f"v{i}" for i in range(1, 9)]
    checked = run_cli("registry", "verify", "busy", "--storage", storage)
    assert checked.returncode == 0 and "8 version(s) checked, 0 problem(s)" in checked.stdout
    aliases = read_aliases(Registry.open(storage), "busy")
    assert aliases.aliases["latest"] == "v8" == read_aliases_latest(storage, "busy")
    assert len([e for e in aliases.history if e.action == "publish"]) <= 8


# -- verify --------------------------------------------------------------------------------------------------


def test_verify_names_a_tampered_file(storage, adapters):
    published = publish_adapter(storage, "pricing", adapters["a"])
    publish_adapter(storage, "pricing", adapters["b"])
    assert run_cli("registry", "verify", "--storage", storage).returncode == 0
    weights = published.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (published.path / "extra.bin").write_bytes(b"x")
    result = run_cli("registry", "verify", "--storage", storage)
    assert result.returncode == 1
    assert "adapters/pricing@v1/adapter_model.safetensors: sha256 does not match" in result.stdout
    assert "adapters/pricing@v1/extra.bin: not listed in the manifest" in result.stdout
    assert "pricing@v2" not in result.stdout.replace("checked", "")


# -- the training-to-serving contract ------------------------------------------------------------------------


def write_profile(folder: Path, **fields) -> Path:
    import yaml

    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump({"base_model": BASE, "max_lora_rank": 16, "engine": "vllm", **fields}))
    return path


def test_publish_target_refuses_what_vllm_would_reject(storage, adapters, tmp_path):
    profile = write_profile(tmp_path)
    cases = {
        "r64": "rank r=64 is above the server's max_lora_rank 16",
        "saves_lm_head": "modules_to_save ['lm_head']",
        "other_base": "base model 'meta-llama/Llama-3.1-8B' differs from the server's 'builtin:tiny-llama'",
    }
    for key, reason in cases.items():
        run_dir = make_run(storage, f"run-{key.replace('_', '-')}", adapters[key])
        result = run_cli("publish", str(run_dir), "--name", "served", "--target", str(profile), "--storage", storage)
        assert result.returncode == 1, result.stderr
        assert reason in result.stderr
    assert list_entries(storage) == []
    ok = run_cli(
        "publish",
        str(make_run(storage, "run-ok", adapters["a"])),
        "--name",
        "served",
        "--target",
        str(profile),
        "--storage",
        storage,
    )
    assert ok.returncode == 0, ok.stderr
    bad_profile = write_profile(tmp_path, max_lora_rank=17)
    result = run_cli("publish", "run-ok", "--name", "served", "--target", str(bad_profile), "--storage", storage)
    assert result.returncode == 2 and "max_lora_rank" in result.stderr


def test_contract_reports_every_reason_at_once(adapters, tmp_path):
    folder = tmp_path / "everything-wrong"
    shutil.copytree(adapters["saves_lm_head"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config |= {"r": 64, "use_dora": True, "base_model_name_or_path": "someone/else"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    profile = ServingProfile(
        base_model=BASE, max_lora_rank=16, supported_target_modules=["q_proj"], tokenizer_hash="0" * 64
    )
    reasons = check_adapter_against_profile(folder, profile)
    expected = ["DoRA", "base model", "r=64", "modules_to_save", "lm_head weights", "['v_proj']", "tokenizer"]
    for fragment in expected:
        assert any(fragment in reason for reason in reasons), (fragment, reasons)
    assert check_adapter_against_profile(adapters["a"], ServingProfile(base_model=BASE)) == []
    cpu = ServingProfile(base_model=BASE, engine="cpu")
    assert check_adapter_against_profile(adapters["saves_lm_head"], cpu) == []  # PEFT on CPU loads these


# -- aliases: promotion gate, force, rollback ----------------------------------------------------------------


def test_promotion_gate_force_and_rollback(storage, adapters):
    cli = ("--storage", storage)
    policy = run_cli(
        "registry", "policy", "gate", "--set", "thresholds.accuracy.min=0.8", "--set", "max_regression.mae=0.05", *cli
    )
    assert policy.returncode == 0 and "accuracy" in policy.stdout
    for index, metrics in enumerate(
        [{"accuracy": 0.9, "mae": 10.0}, {"accuracy": 0.7, "mae": 9.0}, {"accuracy": 0.95, "mae": 12.0}], start=1
    ):
        make_run(storage, f"run-{index}", adapters["a"], metrics)
        assert publish_run(storage, f"run-{index}", name="gate").version == f"v{index}"

    assert run_cli("promote", "gate", "v1", *cli).returncode == 0
    below = run_cli("promote", "gate", "v2", *cli)
    assert below.returncode == 1 and "accuracy = 0.7 is below the minimum 0.8" in below.stderr
    regressed = run_cli("promote", "gate", "v3", *cli)
    assert regressed.returncode == 1 and "mae = 12 regresses more than 5% from prod" in regressed.stderr
    assert resolve(storage, "gate@prod").version == "v1"

    no_reason = run_cli("promote", "gate", "v2", "--force", *cli)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    forced = run_cli("promote", "gate", "v2", "--force", "--reason", "hotfix, eval pending", *cli)
    assert forced.returncode == 0, forced.stderr
    assert resolve(storage, "gate@prod").version == "v2"
    event = read_aliases(Registry.open(storage), "gate").history[-1]
    assert (event.action, event.version, event.previous, event.forced) == ("promote", "v2", "v1", True)
    assert event.reason == "hotfix, eval pending" and "accuracy" in event.gate[0]

    back = run_cli("rollback", "gate", *cli)
    assert back.returncode == 0 and "v2 -> v1" in back.stdout
    assert resolve(storage, "gate@prod").version == "v1"
    assert run_cli("rollback", "gate", *cli).returncode == 1  # nothing promoted before v1
    assert run_cli("promote", "gate", "v1", "--alias", "latest", *cli).returncode == 2
    with pytest.raises(PromotionRefused):
        promote(storage, "gate", "v2", alias="staging-eu")  # the gate applies to every alias by default
    assert verify(storage).ok


def test_unpublish_is_atomic_and_never_reuses_numbers(storage, adapters):
    for _ in range(3):
        publish_adapter(storage, "short", adapters["a"])
    promote(storage, "short", "v2")
    with pytest.raises(InvalidReference):
        unpublish(storage, "short")  # an explicit version is required
    with pytest.raises(Exception, match="prod"):
        unpublish(storage, "short@v2")
    assert unpublish(storage, "short@v3") == "v3"
    assert list_entries(storage, "short")[0].versions == ["v1", "v2"]
    assert resolve(storage, "short").version == "v2"
    assert publish_adapter(storage, "short", adapters["b"]).version == "v4"
    assert verify(storage).ok


# -- weighted composition ------------------------------------------------------------------------------------


def test_compose_linear_differs_from_parents_and_reloads(storage, adapters, tiny_model_dir):
    publish_adapter(storage, "style", adapters["a"])
    publish_adapter(storage, "domain", adapters["b"])
    composed = compose_adapters(storage, ["style@latest", "domain@v1"], [0.7, 0.3], name="blend", method="linear")
    assert composed.reference == "blend@v1"
    assert composed.manifest.parents == ["style@v1", "domain@v1"]
    assert composed.manifest.composition["method"] == "linear" and composed.manifest.base_model == BASE
    blended = logits(tiny_model_dir, composed.path)
    for parent in ("a", "b"):
        assert (blended - logits(tiny_model_dir, adapters[parent])).abs().max() > 1e-4
    assert (blended - logits(tiny_model_dir)).abs().max() > 1e-4
    with pytest.raises(InvalidReference, match="needs --density"):
        compose_adapters(storage, ["style", "domain"], [0.5, 0.5], name="bad", method="ties")
    assert verify(storage).ok


def test_compose_cli_takes_weights_after_the_option(storage, adapters):
    from typer.testing import CliRunner

    from lorafleet.cli import app
    from lorafleet.cli.registry import split_weights

    assert split_weights(["a@v1", "b@v1", "0.3"], ["0.7"]) == (["a@v1", "b@v1"], [0.7, 0.3])
    assert split_weights(["a", "b", "c"], ["0.5,0.3,0.2"]) == (["a", "b", "c"], [0.5, 0.3, 0.2])
    publish_adapter(storage, "style", adapters["a"])
    publish_adapter(storage, "domain", adapters["b"])
    # In-process (torch is already loaded here); the subprocess CLI path is the same command function.
    args = ["compose", "style@v1", "domain@v1", "--weights", "0.7", "0.3", "--method", "cat", "--name", "mix"]
    result = CliRunner().invoke(app, [*args, "--storage", storage])
    assert result.exit_code == 0, result.output
    found = resolve(storage, Reference("mix", "v1"))
    assert found.manifest.rank == 16 and found.manifest.composition["weights"] == [0.7, 0.3]


@pytest.mark.parametrize("kind", ["directory", "broken link", "link to a directory"])
def test_a_policy_that_cannot_be_read_refuses_promotion_instead_of_skipping_the_gate(tmp_path, adapters, kind):
    """A ConfigMap mounts policy.yaml through links: a broken one (or a directory) must never mean "no gate"."""
    storage = str(tmp_path / "storage")
    make_run(storage, "run-1", adapters["a"], {"accuracy": 0.1})
    publish_run(storage, "run-1", name="gated")
    policy = Path(storage) / "adapters" / "gated" / "policy.yaml"
    if kind == "directory":
        policy.mkdir()
    elif kind == "broken link":
        policy.symlink_to(tmp_path / "configmap" / "..data" / "policy.yaml")
    else:
        (tmp_path / "configmap").mkdir()
        policy.symlink_to(tmp_path / "configmap")
    result = run_cli("promote", "gated", "v1", "--storage", storage)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"promotion policy {policy} is" in result.stderr and "nothing is promoted" in result.stderr
    assert "Traceback" not in result.stderr
    assert "prod" not in read_aliases(Registry.open(storage), "gated").aliases
    (policy.rmdir() if kind == "directory" else policy.unlink())
    assert run_cli("promote", "gated", "v1", "--storage", storage).returncode == 0  # no policy at all: no gate
