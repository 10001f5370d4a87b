"""Helm chart checks for helm/rtgate (run from the repository root):

    .venv/bin/pip install helm-python-sdk kubernetes-validate pytest pyyaml
    .venv/bin/pytest tests/deploy/test_helm.py -q

Lint and render go through helm-python-sdk (Helm's Go SDK, no helm binary); every manifest is
validated offline against the Kubernetes 1.30 schemas (strict); every rendered rtgate.toml is
fed to `rtgate config check`, so a chart value the binary does not understand fails here.
"""

import copy
import json
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
    "redis-cluster": {
        "broker": {"kind": "redis"},
        "redis": {"cluster": {"nodes": [f"redis-cluster-{i}.redis-cluster:6379" for i in range(6)]},
                  "tls": {"enabled": True}},
    },
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


# ---- "safe to expose to the internet": demo off, admin listener, every limit a value ----------

# rtgate key -> chart value (camelCase), for every key the security work added or now exposes.
SECURITY_KEYS = {
    "server.max_connections": "server.maxConnections",
    "server.max_connections_per_user": "server.maxConnectionsPerUser",
    "server.connect_rate_per_ip": "server.connectRatePerIp",
    "server.connect_burst_per_ip": "server.connectBurstPerIp",
    "server.trusted_proxies": "server.trustedProxies",
    "server.allowed_origins": "server.allowedOrigins",
    "server.header_read_timeout": "server.headerReadTimeout",
    "server.admin_listen": "admin.port",
    "server.demo": "demo.enabled",
    "auth.jwt_leeway": "auth.jwtLeeway",
    "auth.issuer": "auth.issuer",
    "auth.audience": "auth.audience",
    "auth.max_token_lifetime": "auth.maxTokenLifetime",
    "auth.public_key_file": "auth.publicKey",
    "auth.jwks_url": "auth.jwksUrl",
    "auth.jwks_refresh": "auth.jwksRefresh",
    "ws.max_frame_bytes": "ws.maxFrameBytes",
    "ws.send_queue_max": "ws.sendQueueMax",
    "ws.send_queue_max_bytes": "ws.sendQueueMaxBytes",
    "ws.max_rooms_per_connection": "ws.maxRoomsPerConnection",
    "ws.max_json_depth": "ws.maxJsonDepth",
    "ws.max_presence_bytes": "ws.maxPresenceBytes",
    "ws.rate_limit_per_sec": "ws.rateLimitPerSec",
    "ws.rate_limit_burst": "ws.rateLimitBurst",
    "ws.max_violations": "ws.maxViolations",
    "ws.idle_timeout": "ws.idleTimeout",
    "rooms.max_presence_per_room": "rooms.maxPresencePerRoom",
}
# Set from the Secret or the pod, never in the ConfigMap.
FROM_ENV = {"server.instance_id", "auth.jwt_secret", "auth.api_keys"}
# Non-default values for every key above: they must reach the effective config unchanged.
CUSTOM = {
    "server": {"maxConnections": 1234, "maxConnectionsPerUser": 7, "connectRatePerIp": 3,
               "connectBurstPerIp": 9, "trustedProxies": ["10.0.0.0/8", "fd00::/8"],
               "allowedOrigins": ["https://app.example.com", "https://*.example.org"],
               "headerReadTimeout": "5s"},
    "admin": {"port": 9191},
    "auth": {"issuer": "https://id.example.com/", "audience": ["a", "b"],
             "maxTokenLifetime": "1h", "jwksUrl": "https://id.example.com/jwks.json",
             "jwksRefresh": "10m", "jwtLeeway": "5s"},
    "ws": {"sendQueueMaxBytes": 2097152, "maxRoomsPerConnection": 16, "maxJsonDepth": 8,
           "maxPresenceBytes": 512, "maxFrameBytes": 32768},
    "rooms": {"maxPresencePerRoom": 50},
}
PEM = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n"


def toml_of(docs):
    return tomllib.loads(one(docs, "ConfigMap")["data"]["rtgate.toml"])


def dig(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def effective(chart, values, rtgate_bin, tmp_path):
    path = tmp_path / "rtgate.toml"
    path.write_text(one(render(chart, values), "ConfigMap")["data"]["rtgate.toml"])
    res = config_check(rtgate_bin, path)
    assert res.returncode == 0, res.stderr
    return tomllib.loads(res.stdout)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_demo_off_and_admin_listener(chart, scenario, rtgate_bin, tmp_path):
    server = toml_of(render(chart, SCENARIOS[scenario]))["server"]
    assert server["demo"] is False, "the chart must set server.demo = false explicitly"
    assert server["admin_listen"] == "0.0.0.0:9090", server
    cfg = effective(chart, SCENARIOS[scenario], rtgate_bin, tmp_path)
    assert cfg["server"]["demo"] is False and cfg["server"]["admin_listen"] == "0.0.0.0:9090"
    assert cfg["server"]["listen"] == "0.0.0.0:8080"


def service_reaches(svc, container_ports):
    """Container port names a Service's ports lead to (targetPort by name or by number)."""
    by_number = {p["containerPort"]: p["name"] for p in container_ports}
    out = set()
    for p in svc["spec"]["ports"]:
        t = p.get("targetPort", p["port"])
        out.add(by_number.get(t, t) if isinstance(t, int) else t)
    return out


@pytest.mark.parametrize("scenario, extra", [
    ("redis-url", {}),                              # the defaults plus a broker address
    ("redis-url", {"ingress": {"enabled": True}}),
    ("production", {}),                             # Ingress, ServiceMonitor, NetworkPolicy
    ("redis-url", {"metrics": {"service": {"enabled": True}}, "ingress": {"enabled": True},
                   "admin": {"port": 9191}}),
])
def test_ingress_and_public_service_never_reach_admin_port(chart, scenario, extra):
    values = merge(SCENARIOS[scenario], extra)
    docs = render(chart, values)
    ports = container(docs)["ports"]
    admin_port = merge({"admin": {"port": 9090}}, values)["admin"]["port"]
    assert {p["name"]: p["containerPort"] for p in ports} == {"http": 8080, "admin": admin_port}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    public = services["rtgate"]
    assert service_reaches(public, ports) == {"http"}, public["spec"]["ports"]
    metrics_svc = services.pop("rtgate-metrics", None)
    monitored = bool(values.get("metrics", {}).get("serviceMonitor", {}).get("enabled")) or \
        bool(values.get("metrics", {}).get("service", {}).get("enabled"))
    assert (metrics_svc is not None) == monitored, sorted(services)
    if not monitored:
        # Default render: no Service port at all leads to the admin port.
        assert all("admin" not in service_reaches(s, ports) for s in services.values())
    else:
        assert service_reaches(metrics_svc, ports) == {"admin"}
        assert metrics_svc["spec"]["type"] == "ClusterIP"
    for ing in (d for d in docs if d["kind"] == "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = services[backend["name"]]
                assert svc is public, f"Ingress {path['path']} -> {backend['name']}"
                (port,) = [p for p in svc["spec"]["ports"]
                           if p["name"] == backend["port"].get("name")
                           or p["port"] == backend["port"].get("number")]
                assert service_reaches({"spec": {"ports": [port]}}, ports) == {"http"}
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["admin"]
        selected = [s for s in [public, metrics_svc] if s and all(
            s["metadata"]["labels"].get(k) == v
            for k, v in sm["spec"]["selector"]["matchLabels"].items())]
        assert selected == [metrics_svc], "the ServiceMonitor must select the metrics Service only"
    # Probes stay on the public port.
    c = container(docs)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_network_policy_opens_admin_port_to_monitoring_only(chart):
    docs = render(chart, SCENARIOS["production"])
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    by_port = {r["ports"][0]["port"]: r for r in rules}
    assert set(by_port) == {"http", "admin"} and all(len(r["ports"]) == 1 for r in rules)
    assert by_port["admin"]["from"] == SCENARIOS["production"]["networkPolicy"]["metricsFrom"]
    assert by_port["http"]["from"] == SCENARIOS["production"]["networkPolicy"]["ingressFrom"]
    assert "monitoring" not in str(by_port["http"]["from"])
    # Default values: admin open to the "monitoring" namespace, http to everyone.
    docs = render(chart, merge(SCENARIOS["redis-url"], {"networkPolicy": {"enabled": True}}))
    rules = {r["ports"][0]["port"]: r for r in one(docs, "NetworkPolicy")["spec"]["ingress"]}
    assert "from" not in rules["http"] and rules["admin"]["from"]
    # Without metricsFrom the admin port is closed entirely.
    docs = render(chart, merge(SCENARIOS["redis-url"],
                               {"networkPolicy": {"enabled": True, "metricsFrom": []}}))
    assert [r["ports"][0]["port"] for r in one(docs, "NetworkPolicy")["spec"]["ingress"]] == ["http"]


def test_prometheus_rule_matches_metrics_service(chart):
    docs = render(chart, SCENARIOS["production"])
    exprs = [r["expr"] for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert any('job="rtgate-metrics"' in e for e in exprs), exprs


SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.mark.parametrize("key", SECURITY_KEYS)
def test_security_key_in_schema_values_and_toml(chart, key):
    value_path = SECURITY_KEYS[key]
    node = SCHEMA
    for part in value_path.split("."):
        assert part in node.get("properties", {}), f"values.schema.json lacks {value_path}"
        node = node["properties"][part]
    assert set(node) - {"description"}, f"values.schema.json {value_path}: no type or bounds"
    dig(VALUES, value_path)  # KeyError when values.yaml does not document it
    values = merge(SCENARIOS["redis-url"], CUSTOM)
    if key == "auth.public_key_file":
        values = merge(values, {"auth": {"publicKey": PEM, "jwksUrl": ""}})
    rendered = toml_of(render(chart, values))
    dig(rendered, key)  # KeyError when the ConfigMap does not render it


def test_every_config_key_rendered(chart, rtgate_bin, tmp_path):
    """Every key of [server], [auth], [ws], [rooms] that rtgate knows is in the chart's
    rtgate.toml (or comes from the Secret / the pod): a new rtgate key is caught here."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    res = config_check(rtgate_bin, empty)
    known = tomllib.loads(res.stdout)
    rendered = toml_of(render(chart, merge(SCENARIOS["redis-url"], CUSTOM)))
    for section in ("server", "auth", "ws", "rooms"):
        for key in known[section]:
            dotted = f"{section}.{key}"
            if dotted not in FROM_ENV:
                assert key in rendered[section], f"{dotted} is not rendered by the chart"


def test_custom_values_reach_effective_config(chart, rtgate_bin, tmp_path):
    cfg = effective(chart, merge(SCENARIOS["redis-url"], CUSTOM), rtgate_bin, tmp_path)
    s, a, w = cfg["server"], cfg["auth"], cfg["ws"]
    assert s["admin_listen"] == "0.0.0.0:9191" and s["demo"] is False
    assert (s["max_connections"], s["max_connections_per_user"]) == (1234, 7)
    assert (s["connect_rate_per_ip"], s["connect_burst_per_ip"]) == (3, 9)
    assert s["trusted_proxies"] == CUSTOM["server"]["trustedProxies"]
    assert s["allowed_origins"] == CUSTOM["server"]["allowedOrigins"]
    assert s["header_read_timeout"] == "5s"
    assert a["issuer"] == "https://id.example.com/" and a["audience"] == ["a", "b"]
    assert a["max_token_lifetime"] == "1h" and a["jwks_refresh"] == "10m"
    assert a["jwks_url"] == "https://id.example.com/jwks.json" and a["jwt_leeway"] == "5s"
    assert (w["send_queue_max_bytes"], w["max_rooms_per_connection"], w["max_json_depth"],
            w["max_presence_bytes"], w["max_frame_bytes"]) == (2097152, 16, 8, 512, 32768)
    assert cfg["rooms"]["max_presence_per_room"] == 50
    # A single audience may be written as a string.
    cfg = effective(chart, merge(SCENARIOS["redis-url"], {"auth": {"audience": "rtgate"}}),
                    rtgate_bin, tmp_path)
    assert cfg["auth"]["audience"] == ["rtgate"]
    # Demo on only when asked for, and still explicit.
    cfg = effective(chart, merge(SCENARIOS["memory"], {"demo": {"enabled": True}}),
                    rtgate_bin, tmp_path)
    assert cfg["server"]["demo"] is True


def mounted_file(docs, path):
    """(volume, item key) that provides `path` in the rtgate container."""
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in c["volumeMounts"]:
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            assert m.get("readOnly") is True, m
            return volumes[m["name"]], path[len(prefix):]
    pytest.fail(f"{path} is not under any volumeMount of the container")


def test_public_key_inline(chart):
    docs = render(chart, merge(SCENARIOS["redis-url"], {"auth": {"publicKey": PEM}}))
    key_file = toml_of(docs)["auth"]["public_key_file"]
    volume, name = mounted_file(docs, key_file)
    cm = one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert cm["data"][name].strip() == PEM.strip()


def test_public_key_from_existing_secret(chart, rtgate_bin, tmp_path):
    values = merge(SCENARIOS["redis-url"], {"auth": {"existingPublicKeySecret": "idp-key",
                                                     "existingSecret": "my-auth"}})
    docs = render(chart, values)
    key_file = toml_of(docs)["auth"]["public_key_file"]
    volume, name = mounted_file(docs, key_file)
    assert volume["secret"]["secretName"] == "idp-key"
    assert [i["key"] for i in volume["secret"]["items"]] == [name] == ["public-key.pem"]
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # With a public key the HS256 secret of the existing Secret is optional.
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["RTGATE_AUTH__JWT_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "optional" not in {e["name"]: e for e in container(render(chart, SCENARIOS["redis-url"]))["env"]}[
        "RTGATE_AUTH__JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    with pytest.raises(helm.HelmError, match="only one of publicKey and existingPublicKeySecret"):
        render(chart, merge(values, {"auth": {"publicKey": PEM}}))


def test_room_rules_and_webhooks_reach_the_config(chart, rtgate_bin, tmp_path):
    values = merge(SCENARIOS["redis-url"], {
        "rooms": {"authorizeUrl": "http://app.app:8080/authorize", "authorizeTimeout": "1s",
                  "rules": [{"prefix": "staff:", "policy": "admin"},
                            {"prefix": "doc:", "policy": "hook",
                             "authorizeUrl": "http://docs.app:8080/check"}]},
        "webhooks": {"url": "http://app.app:8080/hooks", "secret": "a-webhook-secret-of-24b",
                     "interval": "2s"},
    })
    docs = render(chart, values)
    toml = one(docs, "ConfigMap")["data"]["rtgate.toml"]
    assert "a-webhook-secret" not in toml, "the webhook secret comes from the Secret"
    secret = one(docs, "Secret")
    assert "webhook-secret" in secret["data"]
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["RTGATE_WEBHOOKS__SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "webhook-secret"
    path = tmp_path / "rtgate.toml"
    path.write_text(toml)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("RTGATE_", "OTEL_"))}
    run_env["RTGATE_WEBHOOKS__SECRET"] = "a-webhook-secret-of-24b"
    res = subprocess.run([str(rtgate_bin), "config", "check", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=run_env)
    assert res.returncode == 0, f"{res.stderr}{res.stdout}\n{toml}"
    effective = tomllib.loads(res.stdout)
    assert effective["rooms"]["rules"] == [
        {"prefix": "staff:", "policy": "admin"},
        {"prefix": "doc:", "policy": "hook", "authorize_url": "http://docs.app:8080/check"}]
    assert effective["rooms"]["authorize_timeout"] == "1s"
    assert effective["webhooks"]["url"] == "http://app.app:8080/hooks"
    assert effective["webhooks"]["secret"] == "<redacted>"
    with pytest.raises(helm.HelmError):
        render(chart, merge(values, {"rooms": {"rules": [{"prefix": "x:", "policy": "everyone"}]}}))


def test_redis_tls_ca_from_existing_secret(chart):
    values = merge(SCENARIOS["redis-cluster"], {"redis": {"tls": {"existingCaSecret": "redis-ca"}}})
    docs = render(chart, values)
    redis = toml_of(docs)["redis"]
    assert redis["tls"] is True
    volume, name = mounted_file(docs, redis["tls_ca_file"])
    assert volume["secret"]["secretName"] == "redis-ca"
    assert [i["key"] for i in volume["secret"]["items"]] == [name] == ["ca.crt"]
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert "tls_ca_file" not in toml_of(render(chart, SCENARIOS["redis-cluster"]))["redis"]


@pytest.mark.parametrize("values, path", [
    ({"auth": {"jwtSecret": "short-secret-of-31-bytes-------"}}, "auth/jwtSecret"),
    ({"server": {"maxConnections": 0}}, "server/maxConnections"),
    ({"server": {"connectRatePerIp": -1}}, "server/connectRatePerIp"),
    ({"server": {"trustedProxies": ["not a cidr"]}}, "server/trustedProxies"),
    ({"server": {"allowedOrigins": ["app.example.com"]}}, "server/allowedOrigins"),
    ({"server": {"headerReadTimeout": "10"}}, "server/headerReadTimeout"),
    ({"ws": {"maxJsonDepth": 1}}, "ws/maxJsonDepth"),
    ({"ws": {"maxPresenceBytes": 10}}, "ws/maxPresenceBytes"),
    ({"rooms": {"maxPresencePerRoom": 0}}, "rooms/maxPresencePerRoom"),
    ({"auth": {"jwksUrl": "id.example.com/jwks"}}, "auth/jwksUrl"),
    ({"auth": {"publicKey": "not a pem"}}, "auth/publicKey"),
    ({"admin": {"port": 8080}}, "admin/port"),
    ({"server": {"demo": True}}, "server"),
])
def test_schema_rejects_unsafe_values(chart, values, path):
    assert len("short-secret-of-31-bytes-------") == 31
    with pytest.raises(helm.HelmError) as err:
        render(chart, merge(SCENARIOS["redis-url"], values))
    assert path in str(err.value), str(err.value)
