"""Helm chart checks for helm/rtgate (run from the repository root):

    .venv/bin/pip install helm-python-sdk kubernetes-validate pytest pyyaml
    .venv/bin/pytest tests/deploy/test_helm.py -q

Lint and render go through helm-python-sdk (Helm's Go SDK, no helm binary); every manifest is
validated offline against the Kubernetes 1.30 schemas (strict); every rendered rtgate.toml is
fed to `rtgate config check`, so a chart value the binary does not understand fails here.
"""

import copy
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "rtgate"
KUBE_VERSION = "1.30.0"
# CRDs of the Prometheus Operator: not in the bundled Kubernetes schemas.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

SENTINELS = ["redis-0.redis:26379", "redis-1.redis:26379", "redis-2.redis:26379"]
SCENARIOS = {
    "memory": {"broker": {"kind": "memory"}, "replicaCount": 1},
    "redis-sentinel": {
        "broker": {"kind": "redis"},
        "redis": {"sentinels": SENTINELS, "masterName": "mymaster", "password": "pw-1234",
                  "sentinelPassword": "spw-1234", "minReplicasAck": 1},
        "auth": {"jwtSecret": "a-test-secret-of-at-least-32-bytes", "apiKeys": ["k1", "k2"]},
    },
    "redis-url": {"redis": {"url": "redis://redis-master:6379"}},
    "kafka": {
        "broker": {"kind": "kafka"},
        "kafka": {"brokers": ["kafka-0:9092", "kafka-1:9092"],
                  "properties": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                                 "client.rack": 'zone "a" <1>\\'}},
        "redis": {"url": "redis://redis-master:6379"},
        "telemetry": {"otlpEndpoint": "http://otel:4317", "sampleRatio": 0.25},
    },
    "production": yaml.safe_load((CHART / "values-production.yaml").read_text()),
}


def merge(base, extra):
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as c:
        yield c


def render(chart, values):
    """Render and parse: list of manifest dicts (NOTES.txt left out)."""
    out = chart.render(values, name="rtgate", namespace="rt", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {[d['kind'] for d in docs]}"
    return found[0]




def config_check(rtgate_bin, path):
    """`rtgate config check` without the caller's RTGATE_* variables (RTGATE_BIN among them,
    which rtgate would read as a config key)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTGATE_", "OTEL_"))}
    return subprocess.run([str(rtgate_bin), "config", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_lint():
    # Defaults included: lint reports the template's deliberate `fail` (no Redis address) as
    # info, and the absent optional Bitnami dependency as a warning.
    for name in (None, "redis-sentinel", "memory", "kafka", "production"):
        values = SCENARIOS[name] if name else None
        report = helm.lint(str(CHART), values, kube_version="v" + KUBE_VERSION)
        errors = [m for m in report["messages"] if m["severity"] >= 3] + report.get("errors", [])
        assert not errors, f"helm lint ({name}) failed: {errors}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_validate(chart, scenario):
    docs = render(chart, SCENARIOS[scenario])
    kinds = {d["kind"] for d in docs}
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["apiVersion"]
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{scenario}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                        f"Kubernetes {KUBE_VERSION}: {e.message} at {list(e.path)}")
    expected = {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"}
    assert expected <= kinds, f"{scenario}: missing {sorted(expected - kinds)}"
    has_secret = "Secret" in kinds
    assert has_secret != bool(SCENARIOS[scenario].get("auth", {}).get("existingSecret")), kinds
    if scenario == "production":
        assert {"ServiceMonitor", "PrometheusRule", "Ingress", "NetworkPolicy",
                "HorizontalPodAutoscaler"} <= kinds, f"production rendered only {sorted(kinds)}"
        rule = one(docs, "PrometheusRule")
        alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
        assert "RtgateNoLiveInstances" in alerts, alerts
        assert all('job=~"rtgate.*"' not in r["expr"] for g in rule["spec"]["groups"]
                   for r in g["rules"]), "alert expressions should match this release's job"
        sm = one(docs, "ServiceMonitor")
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        ing = one(docs, "Ingress")
        ann = ing["metadata"]["annotations"]
        assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600", ann
        assert ing["spec"]["ingressClassName"] == "nginx"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_config_accepted_by_binary(chart, scenario, rtgate_bin, tmp_path):
    toml = one(render(chart, SCENARIOS[scenario]), "ConfigMap")["data"]["rtgate.toml"]
    path = tmp_path / "rtgate.toml"
    path.write_text(toml)
    res = config_check(rtgate_bin, path)
    assert res.returncode == 0, f"{scenario}: rtgate config check exit {res.returncode}:\n" \
                                f"{res.stderr}{res.stdout}\n--- rtgate.toml ---\n{toml}"
    kind = merge({"broker": {"kind": "redis"}}, SCENARIOS[scenario])["broker"]["kind"]
    assert f'kind = "{kind}"' in res.stdout, res.stdout
    # Only the broker sections that apply are rendered.
    assert ("[kafka]" in toml) == (kind == "kafka"), toml
    assert ("[redis]" in toml) == (kind != "memory"), toml
    for secret in ("jwt_secret", "api_keys", "password"):
        assert f"{secret} =" not in toml, f"{secret} must come from the Secret, not the ConfigMap"


def container(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_deployment(chart):
    docs = render(chart, SCENARIOS["redis-sentinel"])
    dep = one(docs, "Deployment")
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    c = container(docs)
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > 20 + pre_stop, \
        f"grace period {pod['terminationGracePeriodSeconds']} <= shutdown 20s + preStop {pre_stop}s"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RTGATE_SERVER__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ref = env["RTGATE_AUTH__JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == one(docs, "Secret")["metadata"]["name"], ref
    assert ref["key"] in one(docs, "Secret")["data"], ref
    svc = one(docs, "Service")["spec"]
    assert svc["type"] == "ClusterIP" and svc["ports"][0]["port"] == 80
    assert svc["ports"][0]["name"] == "http"


def test_grace_period_follows_values(chart):
    values = merge(SCENARIOS["redis-url"], {"shutdown": {"grace": "2m"},
                                            "lifecycle": {"preStopSleepSeconds": 7}})
    pod = one(render(chart, values), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120 + 7 + 10


def test_config_change_rolls_pods(chart):
    def checksum(values):
        dep = one(render(chart, values), "Deployment")
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    base = SCENARIOS["redis-url"]
    assert checksum(base) != checksum(merge(base, {"ws": {"sendQueueMax": 7}}))


def test_existing_secret(chart):
    docs = render(chart, merge(SCENARIOS["redis-url"], {"auth": {"existingSecret": "my-auth"}}))
    assert not [d for d in docs if d["kind"] == "Secret"], "no Secret with auth.existingSecret"
    for e in container(docs)["env"]:
        if e["name"].startswith(("RTGATE_AUTH__", "RTGATE_REDIS__")):
            assert e["valueFrom"]["secretKeyRef"]["name"] == "my-auth", e


def test_unknown_broker_kind_rejected(chart, tmp_path):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("broker:\n  kind: rabbitmq\n")
    with pytest.raises(helm.HelmError) as err:
        chart.render(helm.values_from_yaml(bad.read_text()), name="rtgate", namespace="rt")
    assert "broker/kind" in str(err.value) and "memory" in str(err.value), str(err.value)


@pytest.mark.parametrize("values, message", [
    ({}, "broker.kind=redis needs a Redis"),
    ({"broker": {"kind": "memory"}}, "does not share rooms"),
    ({"broker": {"kind": "kafka"}}, "needs kafka.brokers"),
])
def test_unworkable_setups_fail_clearly(chart, values, message):
    with pytest.raises(helm.HelmError) as err:
        render(chart, values)
    assert message in str(err.value), str(err.value)
