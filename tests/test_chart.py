"""The Helm chart: lint, rendering with its main switches, documentation of
every value, the Argo CD health script, and the rendered manifests accepted
by a real API server in a namespace that enforces the restricted Pod Security
profile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from edgeslim.api.crd import build_crd, build_policy_crd, render_crd, render_helm_crd
from tests.cluster.fixtures import K8s
from tests.cluster.tools import binaries

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "edgeslim"
SETTINGS = ROOT / "edgeslim" / "operator" / "settings.py"
LUA_SCRIPT = CHART / "files" / "argocd-health.lua"
POLICY_LUA_SCRIPT = CHART / "files" / "argocd-health-policy.lua"

Manifest = dict[str, Any]


def _helm(*args: str, kubeconfig: Path | None = None) -> str:
    helm = binaries().helm
    if not helm.exists():
        pytest.fail(f"helm is not built ({helm}); run `make controlplane`", pytrace=False)
    cmd = [str(helm), *args] + ([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(*sets: str, namespace: str = "edgeslim-system", release: str = "rel") -> list[Manifest]:
    args = ["template", release, str(CHART), "-n", namespace]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(_helm(*args)) if d]


def one(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [
        m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}"
    return found[0]


def kinds(manifests: list[Manifest]) -> list[str]:
    return sorted(m["kind"] for m in manifests)


# --- no cluster ----------------------------------------------------------------------


def test_helm_lint_passes() -> None:
    _helm("lint", "--strict", str(CHART))
    _helm(
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "watchNamespace=x,metrics.serviceMonitor.enabled=true,crds.enabled=false",
    )


def test_default_render() -> None:
    manifests = render()
    assert kinds(manifests) == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "Pod",  # the `helm test` hook
        "Service",
        "ServiceAccount",
    ]
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["edgeslim", "operator"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] == 65532
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    service = one(manifests, "Service")
    pod_labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_env_names_match_operator_settings() -> None:
    """The chart sets every variable settings.py reads, and nothing it does not."""
    wanted = set(re.findall(r"\bEDGESLIM_[A-Z_]+\b", SETTINGS.read_text()))
    (container,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) == wanted
    assert env["EDGESLIM_COMPRESSOR_COMMAND"] == "'edgeslim'"  # settings.py shlex-splits it
    assert env["EDGESLIM_NAMESPACE"] == ""  # cluster-wide
    assert env["EDGESLIM_METRICS_PORT"] == "8080"
    # Printed as an integer (Helm reads big numbers as floats), and credentials not lent.
    assert env["EDGESLIM_MAX_DOWNLOAD_BYTES"] == "4294967296"
    assert env["EDGESLIM_INHERIT_STORAGE_CREDENTIALS"] == "false"
    assert env["EDGESLIM_COMPRESSOR_SCRATCH_BYTES"] == "0"


def test_compressor_command_round_trips_through_shlex() -> None:
    import shlex

    manifests = render("compressor.command={python,-m,edgeslim.cli}")
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert shlex.split(env["EDGESLIM_COMPRESSOR_COMMAND"]) == ["python", "-m", "edgeslim.cli"]


def test_crds_can_be_left_out_or_dropped_on_uninstall() -> None:
    assert "CustomResourceDefinition" not in kinds(render("crds.enabled=false"))
    for name in ("compressedmodels.edgeslim.io", "compressionpolicies.edgeslim.io"):
        kept = one(render(), "CustomResourceDefinition", name)
        assert kept["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        not_kept = one(render("crds.keep=false"), "CustomResourceDefinition", name)
        assert "annotations" not in not_kept["metadata"]


@pytest.mark.parametrize(
    ("file", "crd"),
    [("compressedmodel.yaml", build_crd), ("compressionpolicy.yaml", build_policy_crd)],
)
def test_chart_crd_is_the_generated_crd(file: str, crd: Callable[[], Manifest]) -> None:
    template = CHART / "templates" / "crds" / file
    assert template.read_text() == render_helm_crd(crd()), (
        "the chart's CRD template is out of date; run `make crd`"
    )
    committed = yaml.safe_load(render_crd(crd()))
    rendered = one(render(), "CustomResourceDefinition", committed["metadata"]["name"])
    assert rendered["spec"] == committed["spec"]
    assert committed["metadata"]["labels"].items() <= rendered["metadata"]["labels"].items()


KUBE = ROOT / "edgeslim" / "operator" / "kube.py"
# kubernetes-client method suffix -> the (apiGroup, resource) it calls.
_CLIENT_RESOURCES = {
    "custom_object": ("edgeslim.io", "compressedmodels"),
    "custom_object_status": ("edgeslim.io", "compressedmodels/status"),
    "job": ("batch", "jobs"),
    "pod": ("", "pods"),
    "deployment": ("apps", "deployments"),
    "service": ("", "services"),
    "secret": ("", "secrets"),
    "event": ("", "events"),
}
_CLIENT_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create",
                 "patch": "patch", "delete": "delete", "replace": "update"}  # fmt: skip
# What kopf does for the handlers in edgeslim/operator/handlers.py: list and watch
# every resource it handles or indexes, patch the CompressedModel (finalizer,
# progress annotations), post core/v1 Events.
# Server-side apply creates the serving Deployment and Service when absent; the API
# server authorizes a create-on-apply as `create` besides the request's `patch`.
APPLY_CREATES = {("apps", "deployments"), ("", "services")}
KOPF_NEEDS = {
    ("edgeslim.io", "compressedmodels"): {"list", "watch", "patch"},
    # Policies are indexed and watched (on.event, no kopf progress annotations).
    ("edgeslim.io", "compressionpolicies"): {"list", "watch"},
    ("batch", "jobs"): {"list", "watch"},
    ("apps", "deployments"): {"list", "watch"},
    ("", "events"): {"create"},
}


def verbs_the_operator_uses() -> dict[tuple[str, str], set[str]]:
    """Every API call in kube.py (the operator's only client) plus kopf's own needs."""
    calls = re.findall(
        r"self\.(?:core|batch|apps|custom)\.(read|get|list|create|patch|delete|replace)"
        r"_namespaced_(\w+)([^)]{0,200})",
        KUBE.read_text(),
    )
    assert calls, "no API calls found in kube.py: the pattern is out of date"
    out: dict[tuple[str, str], set[str]] = {k: set(v) for k, v in KOPF_NEEDS.items()}
    for verb, resource, args in calls:
        group, kind = _CLIENT_RESOURCES[resource]
        if "POLICY_PLURAL" in args:  # a custom-object call on CompressionPolicies
            kind = kind.replace("compressedmodels", "compressionpolicies")
        out.setdefault((group, kind), set()).add(_CLIENT_VERBS[verb])
    for applied in APPLY_CREATES:
        assert "patch" in out[applied], f"{applied} is no longer applied"
        out[applied].add("create")
    return out


def test_kopf_needs_match_the_handlers() -> None:
    from edgeslim.operator import handlers

    resources = (handlers.MODELS, handlers.POLICIES, handlers.JOBS, handlers.DEPLOYMENTS)
    watched = {(g, r) for g, _v, r in resources}
    assert watched == {k for k, v in KOPF_NEEDS.items() if "watch" in v}


# The rules the operator needs, and no more: (apiGroup, resource) -> verbs.
EXPECTED_RULES = verbs_the_operator_uses()
SECRETS = ("", "secrets")
WITHOUT_SECRETS = {k: v for k, v in EXPECTED_RULES.items() if k != SECRETS}


def test_expected_rules_are_the_calls_the_code_makes() -> None:
    # Spelled out once, so a new API call shows up in review as a new permission.
    assert verbs_the_operator_uses() == {
        ("edgeslim.io", "compressedmodels"): {"get", "list", "watch", "create", "patch"},
        ("edgeslim.io", "compressedmodels/status"): {"patch"},
        ("edgeslim.io", "compressionpolicies"): {"list", "watch"},
        ("edgeslim.io", "compressionpolicies/status"): {"patch"},
        ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
        ("", "pods"): {"list"},
        ("", "secrets"): {"get"},
        ("", "events"): {"create"},
        ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "services"): {"get", "create", "patch", "delete"},
    }


def _rules(role: Manifest) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in out, f"{group}/{resource} listed twice"
                out[(group, resource)] = set(rule["verbs"])
    return out


def test_rbac_is_least_privilege_cluster_wide() -> None:
    manifests = render()
    assert _rules(one(manifests, "ClusterRole", "rel-edgeslim")) == EXPECTED_RULES
    discovery = one(manifests, "ClusterRole", "-crd-discovery")
    assert _rules(discovery) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}
    }
    binding = one(manifests, "ClusterRoleBinding", "rel-edgeslim")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-edgeslim", "namespace": "edgeslim-system"}
    ]


def _secret_rule(role: Manifest) -> Manifest | None:
    return next((r for r in role["rules"] if "secrets" in r["resources"]), None)


def test_secret_access_can_be_limited_to_listed_namespaces() -> None:
    manifests = render("rbac.secrets.scope=namespaces", "rbac.secrets.namespaces={vision,audio}")
    assert _rules(one(manifests, "ClusterRole", "rel-edgeslim")) == WITHOUT_SECRETS
    secrets_role = one(manifests, "ClusterRole", "rel-edgeslim-secrets")
    assert secrets_role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    ]
    bindings = [m for m in manifests if m["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["audio", "vision"]
    for b in bindings:
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "rel-edgeslim-secrets",
        }
        assert b["subjects"][0]["name"] == "rel-edgeslim"


def test_secret_access_can_be_off_or_limited_to_names() -> None:
    off = render("rbac.secrets.scope=none")
    assert _rules(one(off, "ClusterRole", "rel-edgeslim")) == WITHOUT_SECRETS
    assert not any(m["metadata"]["name"].endswith("-secrets") for m in off)
    named = one(render("rbac.secrets.names={s3-creds}"), "ClusterRole", "rel-edgeslim")
    assert _secret_rule(named) == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": ["s3-creds"],
    }
    # watchNamespace: the Role in that namespace carries the rule, whatever the scope says.
    role = one(render("watchNamespace=vision", "rbac.secrets.scope=namespaces"), "Role")
    assert _rules(role) == EXPECTED_RULES


@pytest.mark.parametrize(
    "sets",
    [("rbac.secrets.scope=namespaces",), ("rbac.secrets.scope=everywhere",)],
    ids=["namespaces-without-a-list", "unknown-scope"],
)
def test_secret_scope_mistakes_fail_the_render(sets: tuple[str, ...]) -> None:
    helm = binaries().helm
    if not helm.exists():
        pytest.fail(f"helm is not built ({helm}); run `make controlplane`", pytrace=False)
    args = [str(helm), "template", "rel", str(CHART)]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "rbac.secrets" in done.stderr


def test_watch_namespace_uses_a_role_in_that_namespace() -> None:
    manifests = render("watchNamespace=vision")
    role = one(manifests, "Role")
    assert role["metadata"]["namespace"] == "vision"
    assert _rules(role) == EXPECTED_RULES
    binding = one(manifests, "RoleBinding")
    assert binding["metadata"]["namespace"] == "vision"
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"][0]["namespace"] == "edgeslim-system"
    # Only the read-only CRD discovery rule stays cluster-wide.
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "ClusterRole"] == [
        "rel-edgeslim-crd-discovery"
    ]
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "EDGESLIM_NAMESPACE", "value": "vision"} in container["env"]


def test_service_monitor_selects_the_metrics_service() -> None:
    assert "ServiceMonitor" not in kinds(render())
    manifests = render(
        "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"
    )
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prom"


def _leaf_keys(path: Path) -> Iterator[tuple[str, bool]]:
    """(dotted key, documented) for every leaf of values.yaml. A key is documented
    by a `# --` comment right above it or right above one of its parents."""
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m[1]), m[2], m[3].split("#")[0].strip()
        j = i - 1
        while (
            j >= 0 and lines[j].strip().startswith("#") and not lines[j].lstrip().startswith("# --")
        ):
            j -= 1
        own = j >= 0 and lines[j].lstrip().startswith("# --")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = own or any(doc for _, _, doc in stack)
        dotted = ".".join([k for _, k, _ in stack] + [key])
        stack.append((indent, key, documented))
        # A leaf has its value on the same line, or no more-indented line below it.
        nested = i + 1 < len(lines) and re.match(rf"^ {{{indent + 1},}}\S", lines[i + 1])
        if rest or not nested:
            yield dotted, documented


def test_every_value_is_documented() -> None:
    leaves = dict(_leaf_keys(CHART / "values.yaml"))
    assert "compressor.maxConcurrentJobs" in leaves and "resources.limits.memory" in leaves
    undocumented = [k for k, doc in leaves.items() if not doc]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


# --- values.schema.json, images, helm test, logs -------------------------------------


def _schema_node(schema: Manifest, dotted: str) -> Manifest | None:
    node: Manifest | None = schema
    for part in dotted.split("."):
        if node is None:
            return None
        props = node.get("properties", {})
        extra = node.get("additionalProperties")
        node = props.get(part) or (extra if isinstance(extra, dict) else None)
    return node


def test_values_schema_types_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    leaves = [k for k, _ in _leaf_keys(CHART / "values.yaml")]
    untyped = [
        k
        for k in leaves
        if not (node := _schema_node(schema, k)) or not ("type" in node or "oneOf" in node)
    ]
    assert not untyped, f"values.yaml keys without a type in values.schema.json: {untyped}"


def _template_error(*sets: str) -> str:
    helm = binaries().helm
    if not helm.exists():
        pytest.fail(f"helm is not built ({helm}); run `make controlplane`", pytrace=False)
    args = [str(helm), "template", "rel", str(CHART)]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, f"helm template accepted {sets}"
    return done.stderr


@pytest.mark.parametrize(
    ("value", "refusal"),
    [
        (
            "compressor.maxConcurrentJobs=many",
            "at '/compressor/maxConcurrentJobs': got string, want integer",
        ),
        ("metrics.port=70000", "at '/metrics/port'"),
        (
            "storage.inheritCredentials=maybe",
            "at '/storage/inheritCredentials': got string, want boolean",
        ),
        ("logFormat=yaml", "at '/logFormat': value must be one of 'text', 'json'"),
        ("compressor.image=my/compressor:1", "at '/compressor/image': got string, want object"),
        ("compressor.maxConcurentJobs=2", "additional properties 'maxConcurentJobs' not allowed"),
        ("logformat=json", "at '': additional properties 'logformat' not allowed"),
    ],
    ids=[
        "string-for-integer",
        "port-range",
        "string-for-bool",
        "enum",
        "old-image-form",
        "typo",
        "top-level-typo",
    ],
)
def test_values_of_the_wrong_type_are_refused(value: str, refusal: str) -> None:
    err = _template_error(value)
    assert "values don't meet the specifications of the schema" in err
    assert refusal in err


def _operator_env(*sets: str) -> dict[str, str]:
    (container,) = one(render(*sets), "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_compressor_and_serving_images_default_to_the_app_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    env = _operator_env()
    assert env["EDGESLIM_COMPRESSOR_IMAGE"] == f"ghcr.io/edgeslim/compressor:{app_version}"
    assert env["EDGESLIM_SERVING_IMAGE"] == f"ghcr.io/edgeslim/serving:{app_version}"
    env = _operator_env(
        "compressor.image.repository=reg.local/c,compressor.image.tag=gpu-1",
        "serving.image.tag=2.0.0",
    )
    assert env["EDGESLIM_COMPRESSOR_IMAGE"] == "reg.local/c:gpu-1"
    assert env["EDGESLIM_SERVING_IMAGE"] == "ghcr.io/edgeslim/serving:2.0.0"


def test_log_format_reaches_the_operator() -> None:
    assert _operator_env()["EDGESLIM_LOG_FORMAT"] == "text"
    assert _operator_env("logFormat=json")["EDGESLIM_LOG_FORMAT"] == "json"


def _healthz_server(status: int) -> tuple[str, Any]:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status if self.path == "/healthz" else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"ok" if code == 200 else b"no")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_helm_test_pod_checks_healthz_through_the_service() -> None:
    manifests = render(namespace="ops", release="rel")
    pod = one(manifests, "Pod")
    service = one(manifests, "Service", "-metrics")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert (
        container["image"]
        == one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    port = service["spec"]["ports"][0]["port"]
    url = container["command"][-1]
    assert url == f"http://{service['metadata']['name']}.ops.svc:{port}/healthz"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The pod's own program, run here against a stand-in for the Service: it
    # passes on 200 and fails on anything else.
    for status, rc in ((200, 0), (503, 1)):
        base, server = _healthz_server(status)
        try:
            argv = [shutil.which("python3") or "python3", *container["command"][1:-1]]
            done = subprocess.run(
                [*argv, f"{base}/healthz"], capture_output=True, text=True, timeout=30
            )
        finally:
            server.shutdown()
        assert done.returncode == rc, done.stderr
    assert container["command"][0] == "python"
    assert "Pod" not in kinds(render("metrics.service.enabled=false"))


# --- Argo CD health check ----------------------------------------------------------


def _lua_literal(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"[{json.dumps(k)}] = {_lua_literal(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, list):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # numbers, and strings in a form Lua 5.1 reads the same


def argocd_health(obj: Manifest, script: Path = LUA_SCRIPT) -> tuple[str, str]:
    lua = shutil.which("lua5.1")
    if lua is None:
        pytest.skip("lua5.1 not installed (apt-get install lua5.1): Argo CD runs Lua 5.1")
    program = (
        f"obj = {_lua_literal(obj)}\n"
        f"local hs = assert(loadfile({json.dumps(str(script))}))()\n"
        "io.write(hs.status, '\\t', hs.message)\n"
    )
    done = subprocess.run([lua, "-"], input=program, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.split("\t", 1)
    return status, message


def _model(generation: int = 2, **status: Any) -> Manifest:
    obj: Manifest = {"metadata": {"name": "m", "generation": generation}}
    if status:
        obj["status"] = {"observedGeneration": generation, **status}
    return obj


def _ready_condition(message: str) -> list[Manifest]:
    return [{"type": "Ready", "status": "True", "reason": "Serving", "message": message}]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_model(), ("Progressing", "Waiting for the edgeslim operator")),
        (_model(phase="Compressing"), ("Progressing", "Compressing")),
        (
            _model(phase="Ready", conditions=_ready_condition("3/3 replicas serve abc")),
            ("Healthy", "3/3 replicas serve abc"),
        ),
        (
            _model(phase="Failed", message="Job failed: OOMKilled"),
            ("Degraded", "Job failed: OOMKilled"),
        ),
        (
            _model(phase="Rejected", message="accuracy dropped 0.04 > 0.01"),
            ("Degraded", "accuracy dropped 0.04 > 0.01"),
        ),
        (
            {"metadata": {"generation": 3}, "status": {"observedGeneration": 2, "phase": "Ready"}},
            ("Progressing", "Waiting for the operator to observe generation 3"),
        ),
    ],
    ids=["no-status", "compressing", "ready", "failed", "rejected", "stale-generation"],
)
def test_argocd_health_script(obj: Manifest, expected: tuple[str, str]) -> None:
    assert argocd_health(obj) == expected


def test_chart_readme_carries_the_health_script() -> None:
    readme = (CHART / "README.md").read_text()
    for script in (LUA_SCRIPT, POLICY_LUA_SCRIPT):
        for line in script.read_text().splitlines():
            assert f"    {line}".rstrip() in readme, f"README misses: {line}"


def _policy(generation: int = 2, **conditions: str) -> Manifest:
    conds = [
        {"type": t, "status": v, "reason": "R", "message": f"{t} says {v}"}
        for t, v in conditions.items()
    ]
    return {
        "metadata": {"name": "p", "generation": generation},
        "status": {"observedGeneration": generation, "conditions": conds},
    }


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"metadata": {"generation": 1}}, ("Progressing", "Waiting for the edgeslim operator")),
        (
            _policy(Ready="False", Reconciling="True", Stalled="False"),
            ("Progressing", "Ready says False"),
        ),
        (
            _policy(Ready="True", Reconciling="False", Stalled="False"),
            ("Healthy", "Ready says True"),
        ),
        (
            _policy(Ready="False", Reconciling="False", Stalled="True"),
            ("Degraded", "Ready says False"),
        ),
        (
            {"metadata": {"generation": 3}, "status": {"observedGeneration": 2}},
            ("Progressing", "Waiting for the operator to observe generation 3"),
        ),
    ],
    ids=["no-status", "rolling", "ready", "stalled", "stale-generation"],
)
def test_argocd_health_script_for_policies(obj: Manifest, expected: tuple[str, str]) -> None:
    assert argocd_health(obj, POLICY_LUA_SCRIPT) == expected


# --- a real API server ---------------------------------------------------------------

# Just enough of prometheus-operator's CRD for a server-side dry run of the chart's ServiceMonitor.
SERVICE_MONITOR_CRD: Manifest = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture
def restricted_namespace(k8s: K8s, namespace: str) -> str:
    k8s.core.patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/warn": "restricted",
                }
            }
        },
    )
    return namespace


def _server_dry_run(kubeconfig: Path, manifests: list[Manifest], tmp: Path) -> str:
    """`kubectl apply --server-side --dry-run=server`: every admission step, nothing stored."""
    path = tmp / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    done = subprocess.run(
        [
            str(binaries().kubectl),
            f"--kubeconfig={kubeconfig}",
            f"--cache-dir={tmp / 'cache'}",
            "apply",
            "--server-side",
            # The CRD may already exist (tests/test_crd.py), created by another field
            # manager; a dry run only validates, so taking ownership is harmless.
            "--force-conflicts",
            "--dry-run=server",
            "--field-manager=edgeslim-chart-test",
            "-f",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.cluster
@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("crds.enabled=false",),
        ("watchNamespace=NAMESPACE",),
        ("metrics.serviceMonitor.enabled=true",),
        ("rbac.secrets.scope=namespaces", "rbac.secrets.namespaces={NAMESPACE}"),
    ],
    ids=["defaults", "no-crds", "watch-namespace", "service-monitor", "namespaced-secrets"],
)
def test_rendered_chart_is_accepted_by_the_api_server(
    k8s: K8s, restricted_namespace: str, tmp_path: Path, sets: tuple[str, ...]
) -> None:
    ns = restricted_namespace
    if any(s.startswith("metrics.serviceMonitor") for s in sets):
        try:
            k8s.apiextensions.create_custom_resource_definition(SERVICE_MONITOR_CRD)
        except client.exceptions.ApiException as exc:
            if exc.status != 409:
                raise
        _wait_established(k8s, SERVICE_MONITOR_CRD["metadata"]["name"])
    release = f"r{uuid.uuid4().hex[:6]}"
    manifests = render(*(s.replace("NAMESPACE", ns) for s in sets), namespace=ns, release=release)
    warnings = _server_dry_run(k8s.kubeconfig, manifests, tmp_path)
    # PodSecurity only warns for workloads; with warn=restricted set, a violation would show here.
    assert "Warning" not in warnings, warnings


@pytest.mark.cluster
def test_operator_pod_passes_restricted_pod_security(k8s: K8s, restricted_namespace: str) -> None:
    """Pod Security admission only warns about a Deployment; a bare Pod built from its
    template is what the namespace's `enforce: restricted` actually rejects."""
    deployment = one(render(namespace=restricted_namespace), "Deployment")
    template = deployment["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "operator-pod-check", "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "serviceAccountName": "default"},
    }
    created = k8s.core.create_namespaced_pod(restricted_namespace, pod, dry_run="All")
    assert created.spec.security_context.run_as_user == 65532


def _wait_established(k8s: K8s, name: str) -> None:
    from tests.cluster.processes import wait_until

    def established() -> bool:
        status = k8s.apiextensions.read_custom_resource_definition(name).status
        return any(c.type == "Established" and c.status == "True" for c in status.conditions or [])

    wait_until(established, 30, what=f"CRD {name} to be established")


@pytest.mark.cluster
def test_rbac_grants_exactly_what_the_operator_needs(
    k8s: K8s, namespace: str, tmp_path: Path
) -> None:
    """Create the chart's ServiceAccount and RBAC for real and ask the authorizer."""
    release = f"r{uuid.uuid4().hex[:6]}"
    wanted = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    manifests = [m for m in render(namespace=namespace, release=release) if m["kind"] in wanted]
    path = tmp_path / "rbac.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    kubectl = [
        str(binaries().kubectl),
        f"--kubeconfig={k8s.kubeconfig}",
        f"--cache-dir={tmp_path / 'cache'}",
    ]
    subprocess.run(
        [*kubectl, "apply", "-f", str(path)], check=True, capture_output=True, timeout=60
    )
    authz = client.AuthorizationV1Api(k8s.api_client)
    user = f"system:serviceaccount:{namespace}:{release}-edgeslim"

    def allowed(verb: str, group: str, resource: str, subresource: str = "") -> bool:
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace,
                    verb=verb,
                    group=group,
                    resource=resource,
                    subresource=subresource or None,
                ),
            )
        )
        return authz.create_subject_access_review(review).status.allowed

    try:
        assert allowed("patch", "edgeslim.io", "compressedmodels", "status")
        assert allowed("watch", "edgeslim.io", "compressedmodels")
        assert allowed("watch", "edgeslim.io", "compressionpolicies")
        assert allowed("patch", "edgeslim.io", "compressionpolicies", "status")
        assert not allowed("patch", "edgeslim.io", "compressionpolicies")
        assert allowed("create", "batch", "jobs")
        assert allowed("list", "", "pods")
        assert allowed("get", "", "secrets")
        assert allowed("list", "apiextensions.k8s.io", "customresourcedefinitions")
        assert not allowed("list", "", "secrets")  # credentials are read by reference only
        assert not allowed("delete", "edgeslim.io", "compressedmodels")
        assert not allowed("update", "edgeslim.io", "compressedmodels", "status")
        assert not allowed("create", "", "pods")  # pods come from Jobs, never directly
        assert not allowed("create", "apiextensions.k8s.io", "customresourcedefinitions")
        # Verbs the code never uses are gone.
        assert not allowed("get", "", "pods", "log")
        assert not allowed("patch", "batch", "jobs")
        assert not allowed("watch", "", "services")
        assert not allowed("patch", "", "events")
    finally:
        cluster_scoped = [m for m in manifests if m["kind"] != "ServiceAccount"]
        path.write_text(yaml.safe_dump_all(cluster_scoped))
        subprocess.run([*kubectl, "delete", "-f", str(path)], capture_output=True, timeout=60)


@pytest.mark.cluster
def test_install_notes_render(k8s: K8s, namespace: str) -> None:
    notes = _helm(
        "install",
        "notes",
        str(CHART),
        "-n",
        namespace,
        "--dry-run=client",
        "--set",
        "argocd.healthCheckNotes=true,crds.enabled=false",
        kubeconfig=k8s.kubeconfig,
    )
    assert "kubectl get cmodels" in notes
    assert f"helm test notes -n {namespace}" in notes
    assert "resource.customizations.health.edgeslim.io_CompressedModel" in notes
    assert "crds.enabled is false" in notes


@pytest.mark.cluster
def test_namespaced_secret_access_reaches_only_the_listed_namespace(
    k8s: K8s, namespace: str, tmp_path: Path
) -> None:
    release = f"r{uuid.uuid4().hex[:6]}"
    wanted = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "RoleBinding"}
    sets = ("rbac.secrets.scope=namespaces", f"rbac.secrets.namespaces={{{namespace}}}")
    manifests = [
        m for m in render(*sets, namespace=namespace, release=release) if m["kind"] in wanted
    ]
    path = tmp_path / "rbac.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    kubectl = [
        str(binaries().kubectl),
        f"--kubeconfig={k8s.kubeconfig}",
        f"--cache-dir={tmp_path / 'cache'}",
    ]
    subprocess.run(
        [*kubectl, "apply", "-f", str(path)], check=True, capture_output=True, timeout=60
    )
    authz = client.AuthorizationV1Api(k8s.api_client)
    user = f"system:serviceaccount:{namespace}:{release}-edgeslim"

    def may_get_secrets(ns: str) -> bool:
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                resource_attributes=client.V1ResourceAttributes(
                    namespace=ns, verb="get", group="", resource="secrets"
                ),
            )
        )
        return authz.create_subject_access_review(review).status.allowed

    try:
        assert may_get_secrets(namespace)
        assert not may_get_secrets("default")
    finally:
        cluster_scoped = [
            m for m in manifests if m["kind"] in ("ClusterRole", "ClusterRoleBinding")
        ]
        path.write_text(yaml.safe_dump_all(cluster_scoped))
        subprocess.run([*kubectl, "delete", "-f", str(path)], capture_output=True, timeout=60)
