"""The deployment files against the code, offline: no cluster, no Docker engine.

Every kustomize overlay is rendered with the pinned kustomize; core kinds are validated
strictly with kubernetes-validate, Strimzi and Prometheus Operator resources against the CRD
schemas kept in deploy/crds/; the alert rules go through ``promtool check`` and ``promtool
test``; every metric an alert or the dashboard queries must be one the services export on a
real /metrics scrape, and every exported metric must be documented. The workloads' settings
(the Deployments, and the gateway's StatefulSet where its spool is on) are parsed by the
services' own settings code, and the Kafka topics, users and ACLs are checked against the
topics and consumer groups those settings name.

The tools come from ``scripts/deploy-check.sh tools`` (``make test`` runs it first).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from consumers import __main__ as consumer_main
from consumers import dlq_cli
from consumers.alert_rules import load_rules
from consumers.dedupe import dedupe_from_url
from consumers.metrics import ConsumerMetrics
from consumers.replay import replay_group
from consumers.runner import Runner
from consumers.service import build_http
from consumers.settings import ConsumerSettings
from consumers.sinks import SINKS
from gateway.app import build_app
from gateway.settings import GatewaySettings
from onoff_events.event_kinds import KINDS
from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# Kinds that run the services' pods.
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
GATEWAY = "onoff-gateway"
# The gateway's kind in each overlay: a StatefulSet with a spool volume per pod where the
# overlay includes components/gateway-spool, else a Deployment in Kafka-only mode.
GATEWAY_KIND = {"dev": "Deployment", "prod": "StatefulSet"}
# The label each controller gives its pods per revision (topologySpreadConstraints'
# matchLabelKeys): a StatefulSet's pods have no pod-template-hash.
REVISION_LABEL = {"Deployment": "pod-template-hash", "StatefulSet": "controller-revision-hash"}
CRD_DIR = ROOT / "deploy" / "crds"
RULES = K8S / "base" / "monitoring" / "prometheusrule.yaml"
RULE_TESTS = K8S / "base" / "monitoring" / "tests"
DASHBOARD = K8S / "base" / "monitoring" / "dashboards" / "onoff-events.json"
SECRETS_TEMPLATE = K8S / "base" / "secrets.template.yaml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
COMPOSE_RULES = ROOT / "deploy" / "compose" / "prometheus" / "onoff-events.rules.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
RUNBOOK = "https://onoff-events.dev/docs/operations#"
KUSTOMIZE_VERSION = "v5.8.2"  # as scripts/deploy-check.sh installs it
# The oldest Kubernetes the manifests support (matchLabelKeys, unhealthyPodEvictionPolicy).
KUBERNETES_VERSION = "1.31"
SINK_NAMES = tuple(SINKS)
# Series that Prometheus makes itself, not a service.
PROMETHEUS_SERIES = frozenset({"up"})
# Labels Prometheus adds to every series of a ServiceMonitor target, and histogram buckets.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "job", "instance", "service", "container", "endpoint", "le"}
)
KAFKA_USER_PASSWORD = "strimzi-generated-password"  # noqa: S105 # a stand-in for the test


# --- tools and rendering ---------------------------------------------------------------------


def _tool(name: str) -> str:
    candidates = [ROOT / ".cache" / "bin" / name, shutil.which(name)]
    for found in candidates:
        if found and Path(found).is_file():
            return str(found)
    pytest.fail(f"{name} is missing: run scripts/deploy-check.sh tools (make test does)")


@pytest.fixture(scope="module")
def kustomize() -> str:
    binary = _tool("kustomize")
    version = subprocess.run([binary, "version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == KUSTOMIZE_VERSION, "scripts/deploy-check.sh tools pins it"
    return binary


def _build(kustomize: str, path: Path) -> list[dict[str, Any]]:
    built = subprocess.run(
        [kustomize, "build", str(path)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, f"kustomize build {path.relative_to(ROOT)}:\n{built.stderr}"
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(kustomize: str) -> dict[str, list[dict[str, Any]]]:
    """Every overlay, as ``kustomize build`` prints it."""
    return {name: _build(kustomize, K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def base(kustomize: str) -> list[dict[str, Any]]:
    """deploy/k8s/base on its own: the gateway's Deployment as written, before overlays."""
    return _build(kustomize, K8S / "base")


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _workload_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Deployments and StatefulSets."""
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _gateway(docs: list[dict[str, Any]], overlay: str) -> dict[str, Any]:
    """The gateway's workload, of the kind the overlay should give it (and only that one)."""
    for kind in WORKLOAD_KINDS:
        if kind != GATEWAY_KIND[overlay]:
            assert not [d for d in _of_kind(docs, kind) if d["metadata"]["name"] == GATEWAY], (
                f"{overlay}: a {kind} {GATEWAY} besides the {GATEWAY_KIND[overlay]}"
            )
    return _named(docs, GATEWAY_KIND[overlay], GATEWAY)


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- Kubernetes schemas ----------------------------------------------------------------------


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → the strict JSON Schema of each version the CRDs serve."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*/*.yaml")):
        for crd in _load_yaml_docs(path):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = version["schema"]["openAPIV3Schema"]
                    schemas[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return schemas


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI schema as JSON Schema that rejects unknown fields, as
    ``kubectl apply --validate=strict`` does (the API server would drop them silently).
    CEL rules (x-kubernetes-validations) are not evaluated."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key not in ("nullable", "format"):
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _schema_errors(doc: dict[str, Any], crds: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    where = f"{doc['kind']} {doc['metadata'].get('name')}"
    key = (doc["apiVersion"], doc["kind"])
    if key in crds:
        validator = jsonschema.Draft7Validator(crds[key])
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{where}: no schema for {doc['apiVersion']} in Kubernetes {KUBERNETES_VERSION} "
            "nor in deploy/crds"
        ]
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"]
    return []


def test_every_overlay_is_valid_against_kubernetes_and_crd_schemas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Core kinds meet Kubernetes' schemas strictly; KafkaTopic, KafkaUser, ServiceMonitor
    and PrometheusRule meet the schemas of the CRDs in deploy/crds (the served version)."""
    crds = _crd_schemas()
    for name, docs in rendered.items():
        errors = [e for doc in docs for e in _schema_errors(doc, crds)]
        assert not errors, f"overlay {name}:\n" + "\n".join(errors)
    template = [e for doc in _load_yaml_docs(SECRETS_TEMPLATE) for e in _schema_errors(doc, crds)]
    assert not template, "\n".join(template)


def test_crd_validation_rejects_unknown_fields_and_unserved_versions() -> None:
    """The CRD check is strict: a misspelt field or an API version the CRD does not serve
    fails, so the check cannot pass by accepting anything."""
    crds = _crd_schemas()
    topic = _load_yaml_docs(K8S / "base" / "kafka" / "topics.yaml")[0]
    assert _schema_errors(topic, crds) == []
    typo = copy.deepcopy(topic)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    assert any("replica" in e for e in _schema_errors(typo, crds))
    old = copy.deepcopy(topic)
    old["apiVersion"] = "kafka.strimzi.io/v1alpha1"
    assert any("no schema" in e for e in _schema_errors(old, crds))


# --- alert rules -----------------------------------------------------------------------------


def _rule_groups() -> dict[str, Any]:
    return {"groups": yaml.safe_load(RULES.read_text())["spec"]["groups"]}


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in _rule_groups()["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_pass_promtool_check_and_unit_tests(tmp_path: Path) -> None:
    """`promtool check rules` on the PrometheusRule's groups, then the unit tests of
    deploy/k8s/base/monitoring/tests (each main alert fires, and only when it should)."""
    promtool = _tool("promtool")
    (tmp_path / "onoff-events.rules.yaml").write_text(yaml.safe_dump(_rule_groups()))
    checked = subprocess.run(
        [promtool, "check", "rules", "onoff-events.rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = sorted(RULE_TESTS.glob("*.test.yaml"))
    assert tests
    for test in tests:
        shutil.copy(test, tmp_path)
    tested = subprocess.run(
        [promtool, "test", "rules", *(t.name for t in tests)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_unit_tests_cover_every_critical_alert() -> None:
    """Every critical alert has a promtool unit test that expects it to fire."""
    tested: set[str] = set()
    for test in RULE_TESTS.glob("*.test.yaml"):
        for case in yaml.safe_load(test.read_text())["tests"]:
            tested |= {a["alertname"] for a in case.get("alert_rule_test", []) if a["exp_alerts"]}
    critical = {r["alert"] for r in _alert_rules() if r["labels"]["severity"] == "critical"}
    assert critical <= tested, f"no firing unit test for {sorted(critical - tested)}"


def _heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown document (not in code blocks)."""
    anchors, fenced = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_every_alert_is_actionable_with_a_runbook_section() -> None:
    """kube-prometheus style: a severity, a summary, a description with values, and a
    runbook_url to an existing section of docs/operations.md."""
    anchors = _heading_anchors(OPERATIONS.read_text())
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        notes = rule["annotations"]
        assert notes["summary"].strip(), name
        assert re.search(r"\$value|\$labels\.pod", notes["description"]), (
            f"{name}: the description shows no value"
        )
        url = notes["runbook_url"]
        assert url == RUNBOOK + name.lower(), f"{name}: runbook_url {url}"
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"


def test_operations_links_point_to_existing_sections() -> None:
    """Every #anchor link in docs/operations.md leads to one of its headings."""
    text = OPERATIONS.read_text()
    links = set(re.findall(r"\]\(#([\w-]+)\)", text))
    assert links, "no internal links"
    assert links <= _heading_anchors(text), sorted(links - _heading_anchors(text))


def test_compose_prometheus_loads_the_same_rules() -> None:
    """deploy/compose's Prometheus loads a copy of the PrometheusRule's groups."""
    assert yaml.safe_load(COMPOSE_RULES.read_text()) == _rule_groups(), (
        "deploy/compose/prometheus/onoff-events.rules.yaml differs from the PrometheusRule: "
        "copy spec.groups over"
    )


def test_compose_file_passes_the_compose_clients_own_check() -> None:
    """`docker compose config` validates deploy/compose.yaml without a Docker engine."""
    docker = shutil.which("docker")
    plugin = (
        docker is not None
        and (
            subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        ).returncode
        == 0
    )
    # Without Docker's plugin, the client scripts/deploy-check.sh builds.
    command = [docker, "compose"] if docker and plugin else [_tool("docker-compose")]
    checked = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


# --- settings: the manifests as the services read them ---------------------------------------


@dataclass
class Workload:
    """One Deployment's or StatefulSet's container, with the environment it would get in the
    cluster (``cluster_env``) and that environment with its mounted paths moved to local
    folders (``env``), for starting the service here."""

    name: str
    manifest: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str]
    cluster_env: dict[str, str]

    @property
    def kind(self) -> str:
        kind: str = self.manifest["kind"]
        return kind

    @property
    def pod(self) -> dict[str, Any]:
        pod: dict[str, Any] = self.manifest["spec"]["template"]["spec"]
        return pod

    @property
    def command(self) -> list[str]:
        args: list[str] = self.container["args"]
        return args


def _secret_values(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Secrets the pods may read: rendered ones (dev generates them), else the template's
    placeholders (prod expects them from a secret manager), and Strimzi's KafkaUser Secrets."""
    values = {s["metadata"]["name"]: s["stringData"] for s in _load_yaml_docs(SECRETS_TEMPLATE)}
    for user in _of_kind(docs, "KafkaUser"):
        values[user["metadata"]["name"]] = {"password": KAFKA_USER_PASSWORD}
    for secret in _of_kind(docs, "Secret"):
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        values[secret["metadata"]["name"]] = {**data, **secret.get("stringData", {})}
    return values


def _workloads(docs: list[dict[str, Any]], files: Path) -> list[Workload]:
    """Every Deployment's and StatefulSet's environment: env, envFrom, mounted ConfigMap files
    (written to ``files``) and volume claims (an empty folder under ``files``), the paths in
    the environment rewritten to those folders."""
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in _of_kind(docs, "ConfigMap")}
    secrets = _secret_values(docs)
    result = []
    for workload in _workload_docs(docs):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        (container,) = pod["containers"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(config_maps[source["configMapRef"]["name"]])
            if "secretRef" in source:
                env.update(secrets[source["secretRef"]["name"]])
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            ref = var["valueFrom"]["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            assert value is not None or ref.get("optional"), (
                f"{name}: {var['name']} reads Secret {ref['name']} "
                f"key {ref['key']}, which neither the overlay nor {SECRETS_TEMPLATE.name} has"
            )
            if value is not None:
                env[var["name"]] = value
        cluster_env = dict(env)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            if mount["name"] in claims:
                folder = files / name / mount["name"]  # the pod's own claim: empty at first
                folder.mkdir(parents=True)
            elif "configMap" in volumes[mount["name"]]:
                folder = files / name / mount["name"]
                folder.mkdir(parents=True)
                for key, text in config_maps[volumes[mount["name"]]["configMap"]["name"]].items():
                    (folder / key).write_text(text)
            else:
                continue
            env = {k: v.replace(mount["mountPath"], str(folder)) for k, v in env.items()}
        result.append(Workload(name, workload, container, env, cluster_env))
    return result


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_every_workload_starts_with_its_rendered_settings(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    """The services' own settings code accepts the environment each Deployment or
    StatefulSet gets (ConfigMaps, Secrets, mounted rules, the spool's volume), and its sink
    and dedupe store build from it."""
    workloads = _workloads(rendered[overlay], tmp_path)
    services = sorted(
        (w.command[-1], ConsumerSettings.from_env(w.command[-1], w.env).kind.name)
        for w in workloads
        if w.command[0] == "onoff-consumer"
    )
    # One service per sink and topic.
    assert services == sorted((sink, kind.name) for sink in SINKS for kind in KINDS)
    # The CRM services share one HubSpot token: their paces add up within HubSpot's limits
    # per app (100 requests per 10 s, 5 searches per second), with the margin ours keep.
    crm = [w.env for w in workloads if w.command[-1] == "crm"]
    assert sum(int(e["CRM_REQUESTS_PER_10S"]) for e in crm) <= 90
    assert sum(int(e["CRM_SEARCHES_PER_SECOND"]) for e in crm) <= 4
    assert [w.command for w in workloads if w.command[0] != "onoff-consumer"] == [["onoff-gateway"]]
    for workload in workloads:
        if workload.command == ["onoff-gateway"]:
            assert workload.kind == GATEWAY_KIND[overlay]
            gateway = GatewaySettings.from_env(workload.env)
            assert gateway.port == workload.container["ports"][0]["containerPort"]
            continue
        assert workload.kind == "Deployment", f"{workload.name}: consumers keep no state"
        sink_name = workload.command[1]
        settings = ConsumerSettings.from_env(sink_name, workload.env)
        assert settings.port == workload.container["ports"][0]["containerPort"]
        sink = SINKS[sink_name](workload.env, CollectorRegistry())
        dedupe = dedupe_from_url(
            settings.dedupe_url, settings.group_id, settings.dedupe_ttl_seconds, sink
        )
        await sink.close()
        await dedupe.close()


def _quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity (2Gi, 500M, 1073741824) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    units |= {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", quantity)
    assert match, f"unexpected quantity {quantity}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_spools_on_a_claim_of_its_own_only_as_a_statefulset(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    """Prod: the gateway is a StatefulSet whose volumeClaimTemplate (one claim per pod, kept
    on scale-down and delete, at least 1.5 times GATEWAY_SPOOL_MAX_BYTES) is mounted,
    writable, where GATEWAY_SPOOL_DIR points. Dev: a Deployment in Kafka-only mode, no spool
    and no claim. Either way GatewaySettings.from_env reads the environment the pod gets."""
    docs = rendered[overlay]
    manifest = _gateway(docs, overlay)
    (gateway,) = [w for w in _workloads(docs, tmp_path) if w.name == GATEWAY]
    settings = GatewaySettings.from_env(gateway.cluster_env)
    spec = manifest["spec"]
    if GATEWAY_KIND[overlay] == "Deployment":
        assert settings.spool_dir is None, f"{overlay}: a spool needs a volume per pod"
        assert not any("persistentVolumeClaim" in v for v in gateway.pod.get("volumes", []))
        return
    assert settings.spool_dir is not None, f"{overlay}: the StatefulSet's spool is off"
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    mounts = [
        m for m in gateway.container["volumeMounts"] if Path(m["mountPath"]) == settings.spool_dir
    ]
    assert len(mounts) == 1, f"nothing (or more than one volume) at {settings.spool_dir}"
    (mount,) = mounts
    # A claim template gives each pod its own volume; a pod volume naming one claim would be
    # shared by every replica (the spool file takes one writer).
    assert mount["name"] in claims, f"{settings.spool_dir} is not on a volumeClaimTemplate"
    assert mount["name"] not in {v["name"] for v in gateway.pod.get("volumes", [])}
    assert not mount.get("readOnly"), "the spool writes there"
    assert gateway.container["securityContext"]["readOnlyRootFilesystem"] is True
    security = gateway.pod["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"], "the volume must be writable"
    claim = claims[mount["name"]]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    size = _quantity_bytes(claim["resources"]["requests"]["storage"])
    assert size >= 1.5 * settings.spool_max_bytes, (
        f"a {size} B volume for GATEWAY_SPOOL_MAX_BYTES={settings.spool_max_bytes}: "
        "SQLite's pages, the WAL and the free reserve need 1.5 × (docs/operations.md)"
    )
    # Records still spooled on a claim are replayed when its ordinal runs again.
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenScaled": "Retain",
        "whenDeleted": "Retain",
    }
    assert _named(docs, "Service", spec["serviceName"])
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["minReadySeconds"] >= 5


def _without_spool(workload: dict[str, Any], claims: set[str]) -> dict[str, Any]:
    """The gateway's workload less what components/gateway-spool may change: the kind and
    its rollout fields, the claims and their mounts, GATEWAY_SPOOL_DIR, the grace period and
    the revision label of matchLabelKeys; less the image too (the overlays set it)."""
    kept = copy.deepcopy(workload)
    kept.pop("kind")
    kept["metadata"].pop("namespace", None)
    for field in (
        "strategy",
        "updateStrategy",
        "serviceName",
        "podManagementPolicy",
        "persistentVolumeClaimRetentionPolicy",
        "volumeClaimTemplates",
    ):
        kept["spec"].pop(field, None)
    pod = kept["spec"]["template"]["spec"]
    pod.pop("terminationGracePeriodSeconds")
    for constraint in pod.get("topologySpreadConstraints", []):
        constraint.pop("matchLabelKeys")
    for container in pod["containers"]:
        container.pop("image")
        container["env"] = [v for v in container["env"] if v["name"] != "GATEWAY_SPOOL_DIR"]
        container["volumeMounts"] = [
            m for m in container["volumeMounts"] if m["name"] not in claims
        ]
    return kept


def test_gateway_statefulset_is_the_deployment_plus_the_spool(
    rendered: dict[str, list[dict[str, Any]]], base: list[dict[str, Any]]
) -> None:
    """components/gateway-spool turns base/gateway's Deployment into the StatefulSet: its
    pod template (containers, probes, settings, security, preStop, resources, spread) stays
    the Deployment's, apart from the spool itself, so the two cannot drift apart."""
    deployment = _named(base, "Deployment", GATEWAY)
    assert "GATEWAY_SPOOL_DIR" not in {
        v["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for v in c["env"]
    }, "base/gateway is Kafka-only mode"
    for overlay, kind in GATEWAY_KIND.items():
        if kind != "StatefulSet":
            continue
        statefulset = _gateway(rendered[overlay], overlay)
        claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
        assert _without_spool(statefulset, claims) == _without_spool(deployment, set()), (
            f"{overlay}: the gateway's StatefulSet differs from base/gateway's Deployment "
            "beyond the spool"
        )
        pods = [w["spec"]["template"]["spec"] for w in (deployment, statefulset)]
        graces = [p["terminationGracePeriodSeconds"] for p in pods]
        assert graces[1] >= graces[0], f"{overlay}: the spool's drain shortens the grace period"


def test_alert_rules_config_map_loads_with_the_consumers_parser(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The alerts consumer's rule file parses, and only targets it has settings for."""
    for overlay, docs in rendered.items():
        (alerts,) = [
            w for w in _workloads(docs, tmp_path / overlay) if w.name == "onoff-consumer-alerts"
        ]
        rules = load_rules(Path(alerts.env["ALERT_RULES_FILE"]))
        needs = {
            "alertmanager": "ALERTMANAGER_URL",
            "slack": "SLACK_WEBHOOK_URL",
            "pagerduty": "PAGERDUTY_ROUTING_KEY",
        }
        for target in rules.targets - {"log"}:
            assert needs[target] in alerts.env, f"a rule targets {target}: set {needs[target]}"


def test_gateway_grace_period_covers_prestop_drain_and_shutdown(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """SIGTERM comes after the preStop sleep; the gateway then drains and finishes within
    twice GATEWAY_SHUTDOWN_TIMEOUT_SECONDS, plus GATEWAY_SPOOL_DRAIN_SECONDS for the replay
    to empty the spool when it is on: all of it must end before the kubelet's SIGKILL."""
    spooled = set()
    for overlay, docs in rendered.items():
        (gateway,) = [w for w in _workloads(docs, tmp_path / overlay) if w.name == GATEWAY]
        settings = GatewaySettings.from_env(gateway.cluster_env)
        pre_stop = gateway.container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        budget = float(pre_stop[1]) + settings.drain_seconds + 2 * settings.shutdown_timeout_seconds
        if settings.spool_dir is not None:
            budget += settings.spool_drain_seconds
            spooled.add(overlay)
        grace = gateway.pod["terminationGracePeriodSeconds"]
        assert budget < grace, f"{overlay}: gateway needs {budget} s, the grace period is {grace} s"
        assert settings.drain_seconds > 0, "keep serving a moment after SIGTERM"
    assert spooled == {o for o, kind in GATEWAY_KIND.items() if kind == "StatefulSet"}


def test_consumer_grace_period_covers_the_batch_drain(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A consumer gets CONSUMER_SHUTDOWN_TIMEOUT_SECONDS to finish or abandon its batch, then
    leaves the group and closes its sink (10 s each at most) before the kubelet's SIGKILL."""
    for overlay, docs in rendered.items():
        for consumer in _workloads(docs, tmp_path / overlay):
            if consumer.command[0] != "onoff-consumer":
                continue
            settings = ConsumerSettings.from_env(consumer.command[1], consumer.env)
            grace = consumer.pod["terminationGracePeriodSeconds"]
            assert settings.shutdown_timeout_seconds + 20 <= grace, consumer.name


# --- policies the manifests must keep --------------------------------------------------------


def test_every_workload_is_hardened_and_probed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp, requests
    and limits, /healthz liveness and /readyz readiness, a pinned image, and `args` (never
    `command`) so the image's tini entrypoint stays PID 1. Rollouts: a Deployment starts a
    new pod before stopping an old one; a StatefulSet rolls every pod (no partition left
    behind). Topology spread counts the pods of one revision, by the label the workload's
    controller sets."""
    for docs in rendered.values():
        for workload in _workload_docs(docs):
            name = workload["metadata"]["name"]
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            assert pod["automountServiceAccountToken"] is False, name
            for container in pod["containers"]:
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True, name
                assert security["allowPrivilegeEscalation"] is False, name
                assert security["capabilities"]["drop"] == ["ALL"], name
                assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), name
                assert "memory" in container["resources"]["limits"], name
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
                assert "command" not in container, f"{name}: use args, keep tini as PID 1"
                image = container["image"]
                assert ":" in image.rsplit("/", 1)[-1], f"{name}: untagged image {image}"
                assert not image.endswith(":latest"), name
            if workload["kind"] == "Deployment":
                strategy = workload["spec"]["strategy"]["rollingUpdate"]
                assert strategy["maxUnavailable"] == 0, name
            else:
                strategy = workload["spec"]["updateStrategy"]
                assert strategy["type"] == "RollingUpdate", name
                assert strategy.get("rollingUpdate", {}).get("partition", 0) == 0, name
            for constraint in pod.get("topologySpreadConstraints", []):
                assert constraint["matchLabelKeys"] == [REVISION_LABEL[workload["kind"]]], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_hpa_scales_the_gateway_workload(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """The HPA targets the gateway by the kind it has in the overlay (a StatefulSet where
    the spool is on), and the workload leaves its replica count to the HPA."""
    docs = rendered[overlay]
    gateway = _gateway(docs, overlay)
    hpa = _named(docs, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": gateway["apiVersion"],
        "kind": gateway["kind"],
        "name": gateway["metadata"]["name"],
    }
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replicas"


def test_gateway_is_highly_available_in_prod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Prod: at least 2 gateways (the HPA owns the count), spread over zones and nodes, a PDB,
    an Ingress with TLS publishing the webhook path only."""
    docs = rendered["prod"]
    gateway = _gateway(docs, "prod")
    hpa = _named(docs, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["minReplicas"] >= 2
    keys = {
        c["topologyKey"] for c in gateway["spec"]["template"]["spec"]["topologySpreadConstraints"]
    }
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert _named(docs, "PodDisruptionBudget", "onoff-gateway")["spec"]["maxUnavailable"] == 1
    ingress = _named(docs, "Ingress", "onoff-gateway")
    assert ingress["spec"]["tls"][0]["hosts"] == [r["host"] for r in ingress["spec"]["rules"]]
    paths = [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert paths == [k.path for k in KINDS], "only the webhooks are public, never /metrics"


def _partitions(docs: list[dict[str, Any]], topic: str) -> int:
    (found,) = [t for t in _of_kind(docs, "KafkaTopic") if t["spec"]["topicName"] == topic]
    partitions: int = found["spec"]["partitions"]
    return partitions


def test_topics_users_and_acls_match_what_the_services_use(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Each topic a service's settings name exists; each service's KafkaUser (its
    KAFKA_SASL_USERNAME) may do exactly what it needs: the gateway writes the events topic and
    its DLQ; a consumer reads the events topic in its own group and writes its own DLQ.
    Consumer replicas never exceed the events topic's partitions."""
    for overlay, docs in rendered.items():
        acls = {
            u["metadata"]["name"]: {
                (a["resource"]["type"], a["resource"]["name"], a["resource"]["patternType"], op)
                for a in u["spec"]["authorization"]["acls"]
                for op in a["operations"]
            }
            for u in _of_kind(docs, "KafkaUser")
        }
        for user in _of_kind(docs, "KafkaUser"):
            assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        expected: dict[str, set[tuple[str, str, str, str]]] = {}
        for w in _workloads(docs, tmp_path / overlay):
            user = w.env["KAFKA_SASL_USERNAME"]
            if w.command == ["onoff-gateway"]:
                gateway = GatewaySettings.from_env(w.env)
                writes = {t for r in gateway.routes for t in (r.topic, r.dlq_topic)}
                reads, group = set(), None
            else:
                consumer = ConsumerSettings.from_env(w.command[1], w.env)
                writes, reads, group = {consumer.dlq_topic}, {consumer.topic}, consumer.group_id
                assert w.manifest["spec"]["replicas"] <= _partitions(docs, consumer.topic), (
                    f"{overlay}: {w.name} has more replicas than {consumer.topic} partitions"
                )
            expected[user] = {
                ("topic", t, "literal", op) for t in writes for op in ("Write", "Describe")
            }
            if w.command == ["onoff-gateway"]:
                # The start-up size check reads each topic's max.message.bytes.
                expected[user] |= {("topic", t, "literal", "DescribeConfigs") for t in writes}
            expected[user] |= {
                ("topic", t, "literal", op) for t in reads for op in ("Read", "Describe")
            }
            if group:
                expected[user] |= {("group", group, "literal", op) for op in ("Read", "Describe")}
            for topic in writes | reads:
                _partitions(docs, topic)  # the topic exists
        expected["onoff-tools"] = _tools_acls()
        for topic in {name for _, name, _, _ in expected["onoff-tools"] if "." in name}:
            _partitions(docs, topic)
        assert acls == expected, overlay


def _tools_acls() -> set[tuple[str, str, str, str]]:
    """What onoff-dlq and onoff-consumer --replay-from need, from the names their own code
    uses: read every DLQ and the events topic; write the events topic (re-drive), each sink's
    DLQ (a replay's refusals) and the ledger; replay groups by prefix, no live group."""
    env: dict[str, str] = {}
    events = {dlq_cli.events_topic(env, kind) for kind in KINDS}
    read_only = {dlq_cli.gateway_dlq(env, kind) for kind in KINDS}
    read_write = {*events, dlq_cli.ledger_topic(env)} | {
        t for t in dlq_cli.dlq_topics(env) if t not in read_only
    }
    acls = {("topic", t, "literal", op) for t in read_only for op in ("Read", "Describe")}
    acls |= {
        ("topic", t, "literal", op) for t in read_write for op in ("Read", "Write", "Describe")
    }
    prefixes = {replay_group(sink).rsplit("-", 1)[0] + "-" for sink in SINK_NAMES}
    acls |= {("group", g, "prefix", op) for g in prefixes for op in ("Read", "Describe")}
    return acls


def test_prod_topics_are_durable(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Prod: 3 replicas, min.insync.replicas 2, a retention, and at least 12 partitions on
    the events topic; a DLQ topic for the gateway and for every sink."""
    topics = {t["spec"]["topicName"]: t["spec"] for t in _of_kind(rendered["prod"], "KafkaTopic")}
    assert set(topics) == {
        "sms-events",
        "sms-events.dlq",
        "sms-events.redriven",
        "call-events",
        "call-events.dlq",
        "call-events.warehouse.dlq",
        "call-events.alerts.dlq",
        "call-events.crm.dlq",
    } | {f"sms-events.{sink}.dlq" for sink in SINK_NAMES}
    assert topics["sms-events"]["partitions"] >= 12
    for name, spec in topics.items():
        assert spec["replicas"] == 3, name
        assert int(spec["config"]["min.insync.replicas"]) == 2, name
        if name == "sms-events.redriven":
            # The re-drive ledger is compacted and kept: forgetting it re-drives again.
            assert spec["config"]["cleanup.policy"] == "compact"
            continue
        assert int(spec["config"]["retention.ms"]) > 0, name


def test_every_workload_has_a_pdb_a_network_policy_and_a_service_monitor(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Each Deployment and StatefulSet is covered by a PodDisruptionBudget, a NetworkPolicy
    restricting both directions (with DNS egress), and a ServiceMonitor scraping its
    Service's metrics port."""
    for docs in rendered.values():
        services = _of_kind(docs, "Service")
        for workload in _workload_docs(docs):
            name = workload["metadata"]["name"]
            labels = workload["spec"]["template"]["metadata"]["labels"]

            def selects(selector: dict[str, Any], labels: dict[str, str] = labels) -> bool:
                return selector.get("matchLabels", {}).items() <= labels.items()

            assert any(
                selects(p["spec"]["selector"]) for p in _of_kind(docs, "PodDisruptionBudget")
            ), name
            policies = [
                p for p in _of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"])
            ]
            assert policies, name
            for policy in policies:
                assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}, name
                ports = {
                    p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])
                }
                assert 53 in ports, f"{name}: no DNS egress"
            (service,) = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
            port_names = {p["name"] for p in service["spec"]["ports"]}
            service_labels = service["metadata"]["labels"].items()
            monitors = [
                m
                for m in _of_kind(docs, "ServiceMonitor")
                if m["spec"]["selector"]["matchLabels"].items() <= service_labels
            ]
            assert monitors, (
                f"{name}: no ServiceMonitor selects Service {service['metadata']['name']}"
            )
            for monitor in monitors:
                for endpoint in monitor["spec"]["endpoints"]:
                    assert endpoint["port"] in port_names
                    assert endpoint["path"] == "/metrics"


def test_prod_reads_only_secrets_the_template_documents(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Prod holds no Secret: every secretKeyRef names a Secret and key of the template (for
    the secret manager) or a Secret Strimzi writes for a KafkaUser."""
    docs = rendered["prod"]
    assert not _of_kind(docs, "Secret"), "prod Secrets come from a secret manager, not git"
    documented = {
        (s["metadata"]["name"], key)
        for s in _load_yaml_docs(SECRETS_TEMPLATE)
        for key in s["stringData"]
    }
    documented |= {(u["metadata"]["name"], "password") for u in _of_kind(docs, "KafkaUser")}
    for workload in _workload_docs(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert (ref["name"], ref["key"]) in documented, var["name"]


# --- metrics: what the services export, what queries use, what docs say -----------------------


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    labels: frozenset[str]

    @property
    def series(self) -> set[str]:
        """Names a query can use for this family."""
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"),
            "info": ("_info",),
        }.get(self.type, ("",))
        return {self.name + s for s in suffixes}

    @property
    def documented_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name


def _label_names(registry: CollectorRegistry) -> dict[str, frozenset[str]]:
    names: dict[str, frozenset[str]] = {}
    for collector in registry._collector_to_names:
        labels = frozenset(getattr(collector, "_labelnames", ()))
        for metric in collector.describe() if hasattr(collector, "describe") else []:
            # A custom collector (consumers.metrics.BatchHistogram) describes its labels in
            # the family it yields.
            names[metric.name] = labels or frozenset(getattr(metric, "_labelnames", ()))
    return names


async def _scrape(app: web.Application, registry: CollectorRegistry) -> list[Family]:
    """GET /metrics from a running service; families as Prometheus reads them."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession() as http, http.get(server.make_url("/metrics")) as answer:
            assert answer.status == 200
            text = await answer.text()
    finally:
        await server.close()
    labels = _label_names(registry)
    return [
        Family(f.name, f.type, labels.get(f.name, frozenset()))
        for f in text_string_to_metric_families(text)
    ]


@pytest.fixture(scope="module")
async def exported(
    rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Family]:
    """Every metric family the services serve on /metrics, each service started as the prod
    overlay configures it (no broker: the gateway serves anyway, and a consumer's runner is
    built, not run), with the collectors their __main__ adds."""
    families: dict[str, Family] = {}
    workloads = _workloads(rendered["prod"], tmp_path_factory.mktemp("workloads"))
    for workload in workloads:
        # No broker and no Kafka CA file here: plain TCP to a closed port.
        env = {
            **workload.env,
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        }
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        if workload.command == ["onoff-gateway"]:
            app = build_app(GatewaySettings.from_env(env), registry)
            found = await _scrape(app, registry)
        else:
            settings = ConsumerSettings.from_env(workload.command[1], env)
            sink = SINKS[settings.sink](env, registry)
            dedupe = dedupe_from_url(settings.dedupe_url, settings.group_id, 60, sink)
            runner = Runner(settings, sink, dedupe, ConsumerMetrics.create(registry))
            try:
                found = await _scrape(build_http(runner, registry), registry)
            finally:
                await sink.close()
                await dedupe.close()
        for family in found:
            families.setdefault(family.name, family)
    return families


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    }
)


def _metrics_in(expr: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Metric names a PromQL expression selects, and (metric, label) of its matchers."""
    blank = _STRING.sub('""', expr)
    labels = set()
    for metric, matchers in _SELECTOR.findall(blank):
        labels |= {(metric, label) for label in _MATCHER.findall(matchers)}
    bare = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", blank)
    bare = re.sub(r"\[[^\]]*\]", " ", _GROUPING.sub(" ", bare))
    bare = re.sub(r"\$\{?\w+\}?|\b\d[\w.]*", " ", bare)
    names = {n for n in _IDENT.findall(bare) if n not in _KEYWORDS}
    return names, labels


def _dashboard_queries() -> list[str]:
    """The PromQL of every panel target and of every query variable (label_values(m, l) → m)."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"] + [p for row in dashboard["panels"] for p in row.get("panels", [])]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            queries.append(re.sub(r"^label_values\((\w+),\s*\w+\)$", r"\1", query))
    return queries


def test_metric_parser_finds_names_and_labels() -> None:
    """The expression scanner the next test relies on."""
    names, labels = _metrics_in(
        'sum by (namespace, le) (rate(a_bucket{route="/x", status=~"5.."}[5m])) / ignoring(x) '
        'b_total > 0.5 unless on (sink) c{sink="$sink"} offset 5m and up == 0'
    )
    assert names == {"a_bucket", "b_total", "c", "up"}
    assert labels == {("a_bucket", "route"), ("a_bucket", "status"), ("c", "sink")}


def test_alerts_and_dashboard_query_only_exported_metrics_and_labels(
    exported: dict[str, Family],
) -> None:
    """Every metric name and label an alert rule or a dashboard panel uses is one a service
    serves on /metrics (a renamed metric or label breaks this test, not the pager)."""
    by_series = {s: f for f in exported.values() for s in f.series}
    queries = [r["expr"] for r in _alert_rules()] + _dashboard_queries()
    assert len(queries) > 40
    problems = []
    for query in queries:
        names, labels = _metrics_in(query)
        assert names, f"no metric in {query!r}"
        problems += [
            f"{n}: not exported ({query})" for n in names - by_series.keys() - PROMETHEUS_SERIES
        ]
        for metric, label in labels:
            family = by_series.get(metric)
            if family and label not in family.labels | TARGET_LABELS:
                problems.append(f"{metric} has no label {label} ({query})")
    assert not problems, "\n".join(problems)


def test_dashboard_is_a_grafana_sidecar_config_map(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The dashboard JSON parses, has a stable uid, and ships in a ConfigMap labelled for
    Grafana's sidecar in every overlay."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "onoff-events"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for docs in rendered.values():
        config_map = _named(docs, "ConfigMap", "onoff-events-dashboard")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"]["onoff-events.json"]) == dashboard


def _documentation() -> str:
    return (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))
    )


def test_every_exported_metric_is_documented(exported: dict[str, Family]) -> None:
    """Each onoff_* metric appears by its full name in README.md or docs/*.md."""
    docs = _documentation()
    ours = [f for f in exported.values() if f.name.startswith("onoff_")]
    assert len(ours) > 20
    missing = [f.documented_name for f in ours if f.documented_name not in docs]
    assert not missing, f"undocumented metrics: {missing}"


def test_documented_metrics_exist(exported: dict[str, Family]) -> None:
    """No page names a gateway or consumer metric the services do not export (a rename
    leaves no stale name behind in the runbook)."""
    series = {s for f in exported.values() for s in f.series} | exported.keys()
    named = set(re.findall(r"\bonoff_(?:gateway|consumer)_[a-z_]*[a-z]", _documentation()))
    assert not named - series, f"documented but not exported: {sorted(named - series)}"


# --- the image -------------------------------------------------------------------------------


def _lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def test_image_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements.lock (what the Dockerfile installs, --require-hashes) pins a version of
    every runtime dependency in pyproject.toml that its specifier allows; same for the build
    backend in requirements-build.lock. Regenerate with `scripts/deploy-check.sh lock`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for lock, requirements in (
        ("requirements.lock", project["project"]["dependencies"]),
        ("requirements-build.lock", project["build-system"]["requires"]),
    ):
        text = (ROOT / lock).read_text()
        pins = _lock_pins(ROOT / lock)
        assert text.count("--hash=sha256:") >= len(pins), lock
        for requirement in map(Requirement, requirements):
            name = re.sub(r"[-_.]+", "-", requirement.name).lower()
            assert name in pins, f"{lock} lacks {requirement.name}"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock}: {name}=={pins[name]} does not meet {requirement}"
            )


def test_dockerfile_ships_what_the_services_read_at_run_time() -> None:
    """The image copies every package, the schemas (at ONOFF_SCHEMAS_DIR) and config/, runs
    as a numeric non-root user, installs from the locks, and execs tini in exec form."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}:
        assert f"COPY {package} ./{package}" in dockerfile, package
    schemas_dir = re.search(r"ONOFF_SCHEMAS_DIR=(\S+)", dockerfile)
    assert schemas_dir, "ONOFF_SCHEMAS_DIR unset"
    assert f"COPY schemas {schemas_dir.group(1)}" in dockerfile
    assert "COPY config /app/config" in dockerfile
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.MULTILINE)
    assert "--require-hashes" in dockerfile
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in dockerfile
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE)
    for source in {s for sources in copied for s in sources.split()}:
        assert f"!{source}" in allowed or f"!{source}/" in allowed, f".dockerignore drops {source}"


def test_the_replay_job_example_is_valid_and_runs_the_tools_as_their_own_user() -> None:
    """deploy/k8s/jobs/replay-warehouse.yaml (docs/operations.md): valid against Kubernetes'
    schemas; its command line is one our own argument parser accepts; it logs in as the
    onoff-tools KafkaUser, whose password Secret Strimzi writes; its pods get a network policy."""
    docs = _load_yaml_docs(K8S / "jobs" / "replay-warehouse.yaml")
    errors = [e for doc in docs for e in _schema_errors(doc, _crd_schemas())]
    assert not errors, "\n".join(errors)
    (job,) = _of_kind(docs, "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command, *args = container["args"]
    assert command == "onoff-consumer"
    parsed = consumer_main._arguments().parse_args(args)
    assert parsed.sink in SINKS
    assert parsed.replay_from is not None
    env = {e["name"]: e for e in container["env"]}
    assert env["KAFKA_SASL_USERNAME"]["value"] == "onoff-tools"
    assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "onoff-tools"
    users = _load_yaml_docs(K8S / "base" / "kafka" / "users.yaml")
    assert "onoff-tools" in {u["metadata"]["name"] for u in _of_kind(users, "KafkaUser")}
    (policy,) = _of_kind(docs, "NetworkPolicy")
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
