"""Checks of the container and deployment files: run `.venv/bin/pytest tests/deploy -q`.

Needs check-jsonschema, pyyaml and kubernetes-validate in the venv; uses `kubectl kustomize`
when kubectl is on PATH and builds target/debug/rtgate when no binary exists.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "redis-sentinel", K8S / "overlays" / "kafka"]
OVERLAY_BROKER = {"base": "memory", "redis-sentinel": "redis", "kafka": "kafka"}


def load(name):
    return yaml.safe_load((ROOT / name).read_text())


def rtgate_services(compose):
    return {k: v for k, v in compose["services"].items() if k.startswith("rtgate-")}


def interpolate(value):
    """Compose's ${VAR:-default} with an empty environment, as `docker compose up` sees it."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


@pytest.fixture(scope="module")
def readme():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Redis broker", 1)[1].split("\n## ", 1)[0]
    flat = " ".join(section.split())
    m = re.search(r"master on (\d+), replicas on (\d+) and (\d+), and sentinels on "
                  r"(\d+), (\d+) and (\d+) watching master `([^`]+)` \(quorum (\d+)\)", flat)
    assert m, "README 'Redis broker' no longer states the topology in the expected words"
    sentinels = json.loads(re.search(r"RTGATE_REDIS__SENTINELS='([^']+)'", section).group(1))
    return {
        "master": int(m[1]), "replicas": [int(m[2]), int(m[3])],
        "sentinel_ports": [int(m[4]), int(m[5]), int(m[6])], "master_name": m[7],
        "quorum": int(m[8]), "sentinels": sentinels,
        "master_name_env": re.search(r"RTGATE_REDIS__MASTER_NAME=(\S+)", section).group(1),
    }




def seconds(duration):
    """rtgate prints durations the humantime way: `10s`, `1m 30s`."""
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])\b", duration))


def config_check(rtgate_bin, path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTGATE_", "OTEL_"))}
    env.update(extra_env or {})
    out = subprocess.run([str(rtgate_bin), "config", "check", "--config", str(path)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, f"{path}: {out.stderr}"
    return tomllib.loads(out.stdout)


# (a) schema validity of both compose files (offline, vendored compose-spec schema).
@pytest.mark.parametrize(
    "name", ["docker-compose.yml", "docker-compose.redis.yml", "docker-compose.redis-cluster.yml"])
def test_compose_schema(name):
    exe = Path(sys.executable).with_name("check-jsonschema")
    out = subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(ROOT / name)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# (b) ports, master name, sentinels and passwords agree between README and compose files.
def test_redis_topology_matches_readme(readme):
    redis = load("docker-compose.redis.yml")["services"]
    cmds = {name: " ".join(svc.get("command", [])) for name, svc in redis.items()}
    assert f"--port {readme['master']} " in cmds["redis-master"] + " "
    for name, port in zip(["redis-replica-1", "redis-replica-2"], readme["replicas"]):
        assert f"--port {port} " in cmds[name]
        assert f"--replicaof 127.0.0.1 {readme['master']}" in cmds[name]
    sentinel_ports = [int(s["environment"]["SENTINEL_PORT"])
                      for n, s in sorted(redis.items()) if n.startswith("sentinel-")]
    assert sentinel_ports == readme["sentinel_ports"]
    monitor = f"sentinel monitor {readme['master_name']} 127.0.0.1 {readme['master']} {readme['quorum']}"
    for name, svc in redis.items():
        if name.startswith("sentinel-"):
            assert monitor in "".join(svc["command"]), name
    # No AUTH in the local topology (README documents none), so rtgate sets no password.
    assert not re.search(r"requirepass|masterauth|auth-pass", (ROOT / "docker-compose.redis.yml").read_text())
    assert readme["master_name_env"] == readme["master_name"]
    assert readme["sentinels"] == [f"127.0.0.1:{p}" for p in readme["sentinel_ports"]]


def test_compose_rtgate_points_at_compose_sentinels(readme, rtgate_bin, tmp_path):
    compose = load("docker-compose.yml")
    assert "docker-compose.redis.yml" in compose["include"]
    # Host networking everywhere (as in docker-compose.redis.yml): 127.0.0.1 addresses hold.
    assert all(s.get("network_mode") == "host" for s in compose["services"].values())
    services = rtgate_services(compose)
    assert len(services) == 3
    listens, empty = [], tmp_path / "empty.toml"
    empty.write_text("")
    for name, svc in services.items():
        env = {k: interpolate(v) for k, v in svc["environment"].items()}
        assert json.loads(env["RTGATE_REDIS__SENTINELS"]) == readme["sentinels"], name
        assert env["RTGATE_REDIS__MASTER_NAME"] == readme["master_name"], name
        assert env["RTGATE_BROKER__KIND"] == "redis", name
        assert "RTGATE_REDIS__PASSWORD" not in env and "RTGATE_REDIS__URL" not in env
        assert set(svc["depends_on"]) == {"sentinel-1", "sentinel-2", "sentinel-3"}
        effective = config_check(rtgate_bin, empty, env)
        assert effective["redis"]["sentinels"] == readme["sentinels"]
        assert effective["server"]["instance_id"] == name
        listens.append(env["RTGATE_SERVER__LISTEN"])
    ports = [int(a.rsplit(":", 1)[1]) for a in listens]
    taken = [readme["master"], *readme["replicas"], *readme["sentinel_ports"], 8080]
    assert len(set(ports)) == 3 and not set(ports) & set(taken)
    nginx = (ROOT / "deploy/compose/nginx.conf").read_text()
    assert sorted(re.findall(r"^\s*server (\S+?)[ ;]", nginx, re.M)) == sorted(listens)
    for needle in ("proxy_http_version 1.1", "proxy_set_header Upgrade $http_upgrade",
                   "proxy_set_header Connection $connection_upgrade", "listen 8080"):
        assert needle in nginx
    kafka = compose["services"]["kafka"]
    assert kafka["profiles"] == ["kafka"]
    assert "127.0.0.1:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert json.loads(env["RTGATE_KAFKA__BROKERS"]) == ["127.0.0.1:9092"]
    otel = yaml.safe_load((ROOT / "deploy/compose/otel-collector.yaml").read_text())
    assert otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "127.0.0.1:4317"
    jaeger = compose["services"]["jaeger"]["environment"]
    assert otel["exporters"]["otlp/jaeger"]["endpoint"] == jaeger["COLLECTOR_OTLP_GRPC_HOST_PORT"]


# (c) every shipped rtgate.toml passes `rtgate config check`.
def kustomize(directory):
    if shutil.which("kubectl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but kubectl (for `kubectl kustomize`) is not installed")
        pytest.skip("kubectl not installed")
    out = subprocess.run(["kubectl", "kustomize", str(directory)],
                         capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_systemd_config(rtgate_bin):
    cfg = config_check(rtgate_bin, ROOT / "deploy/systemd/rtgate.toml")
    assert cfg["broker"]["kind"] == "redis" and cfg["redis"]["sentinels"]
    unit = (ROOT / "deploy/systemd/rtgate.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M)[1])
    assert stop > seconds(cfg["shutdown"]["grace"])
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure"):
        assert line in unit.splitlines()


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomize_config(directory, rtgate_bin, tmp_path):
    docs = kustomize(directory)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    path = tmp_path / "rtgate.toml"
    path.write_text(cm["data"]["rtgate.toml"])
    cfg = config_check(rtgate_bin, path)
    assert cfg["broker"]["kind"] == OVERLAY_BROKER[directory.name]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    grace = seconds(cfg["shutdown"]["grace"])
    assert pod["terminationGracePeriodSeconds"] > grace + 5  # + the preStop sleep
    volume = [v for v in pod["volumes"] if v["name"] == "config"][0]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert deploy["spec"]["replicas"] == (1 if directory.name == "base" else 3)


# (d) kustomize output (and the Secret example) is valid Kubernetes 1.30, strictly.
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kubernetes_validate(directory):
    docs = kustomize(directory)
    docs.append(yaml.safe_load((K8S / "base/secret.example.yaml").read_text()))
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap",
                                         "PodDisruptionBudget", "Secret"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


# (e) "safe to expose": demo explicit everywhere, secrets long enough, proxies trusted.
DEPLOY_TOMLS = sorted((ROOT / "deploy").rglob("*.toml"))


def test_deploy_tomls_found():
    assert len(DEPLOY_TOMLS) >= 4, DEPLOY_TOMLS


@pytest.mark.parametrize("path", DEPLOY_TOMLS, ids=lambda p: str(p.relative_to(ROOT / "deploy")))
def test_deploy_toml_sets_demo_and_admin(path, rtgate_bin):
    raw = tomllib.loads(path.read_text())
    # Explicit, not the default (which turns the demo on whenever no key is configured).
    assert raw.get("server", {}).get("demo") is False, f"{path}: set [server] demo = false"
    assert raw["server"].get("admin_listen"), f"{path}: metrics belong on server.admin_listen"
    cfg = config_check(rtgate_bin, path)
    assert cfg["server"]["demo"] is False
    admin_port = int(cfg["server"]["admin_listen"].rsplit(":", 1)[1])
    assert admin_port != int(cfg["server"]["listen"].rsplit(":", 1)[1])


def test_kustomize_service_does_not_expose_admin_port():
    docs = kustomize(K8S / "base")
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    ports = {p["name"]: p["containerPort"]
             for p in deploy["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 8080, "admin": 9090}, ports
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"], svc["spec"]["ports"]
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == "9090", ann


@pytest.mark.parametrize("name", ["deploy/systemd/rtgate.env.example",
                                  "deploy/kubernetes/base/secret.example.yaml"])
def test_example_secrets_long_enough(name):
    text = (ROOT / name).read_text()
    values = re.findall(r"^\s*RTGATE_AUTH__JWT_SECRET[=:]\s*(\S+)\s*$", text, re.M)
    assert values, f"{name}: no RTGATE_AUTH__JWT_SECRET example"
    for v in values:
        assert len(v.encode()) >= 32, f"{name}: example secret {v!r} is under 32 bytes"


def test_compose_secret_demo_and_proxies(rtgate_bin, tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for name, svc in rtgate_services(load("docker-compose.yml")).items():
        env = {k: interpolate(v) for k, v in svc["environment"].items()}
        assert len(env["RTGATE_AUTH__JWT_SECRET"].encode()) >= 32, name
        assert env["RTGATE_SERVER__DEMO"] == "true", f"{name}: set RTGATE_SERVER__DEMO explicitly"
        cfg = config_check(rtgate_bin, empty, env)
        assert cfg["server"]["demo"] is True
        # nginx reaches the instances over loopback (host networking) and sets X-Forwarded-For.
        assert cfg["server"]["trusted_proxies"] == ["127.0.0.1/32"], name
    nginx = (ROOT / "deploy/compose/nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For" in nginx


def readme_section(title):
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_config_table_lists_every_key(rtgate_bin, tmp_path):
    """Every key rtgate knows in [server], [auth], [ws], [rooms] has a row in the README's
    configuration table (max_token_lifetime is unset by default, so it is named here)."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    known = config_check(rtgate_bin, empty)
    rows = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)`", readme_section("Configuration"), re.M))
    keys = {f"{s}.{k}" for s in ("server", "auth", "ws", "rooms") for k in known[s]}
    keys |= {"server.admin_listen", "server.demo", "auth.max_token_lifetime"}
    assert not keys - rows, f"README configuration table lacks {sorted(keys - rows)}"
    table = readme_section("Configuration")
    assert re.search(r"`auth\.jwt_secret`.*at least 32 bytes", table)


SECURITY_LIMIT_KEYS = [
    "server.max_connections", "server.max_connections_per_user", "server.connect_rate_per_ip",
    "server.connect_burst_per_ip", "server.trusted_proxies", "server.allowed_origins",
    "server.header_read_timeout", "server.demo", "server.admin_listen", "auth.jwt_secret",
    "auth.public_key_file", "auth.jwks_url", "auth.issuer", "auth.audience",
    "auth.max_token_lifetime", "ws.max_frame_bytes", "ws.send_queue_max",
    "ws.send_queue_max_bytes", "ws.max_rooms_per_connection", "ws.max_json_depth",
    "ws.max_presence_bytes", "rooms.max_presence_per_room", "ws.rate_limit_per_sec",
    "ws.max_violations", "ws.idle_timeout",
]


def test_readme_security_section():
    sec = readme_section("Security")
    for key in SECURITY_LIMIT_KEYS:
        assert f"`{key}`" in sec, f"README Security table lacks {key}"
    checklist = sec.split("Production checklist", 1)[1].lower()
    for item in ("32", "jwks", "demo", "admin_listen", "allowed_origins", "trusted_proxies",
                 "tls", "max_token_lifetime", "api_keys"):
        assert item in checklist, f"production checklist lacks {item}"
    for metric in ("rtgate_connections_refused_total", "rtgate_limit_exceeded_total"):
        assert metric in sec


# (e) the Redis Cluster compose file: 6 nodes on the ports its header names, joined with one
# replica per master, and the rtgate settings it names are accepted by the binary.
def test_compose_redis_cluster(rtgate_bin, tmp_path):
    text = (ROOT / "docker-compose.redis-cluster.yml").read_text()
    services = load("docker-compose.redis-cluster.yml")["services"]
    ports = sorted(int(s["environment"]["NODE_PORT"]) for n, s in services.items()
                   if n.startswith("redis-node-"))
    assert ports == list(range(7000, 7006))
    create = " ".join(services["cluster-create"]["command"])
    assert all(f"127.0.0.1:{p}" in create for p in ports) and "--cluster-replicas 1" in create
    nodes = re.search(r"RTGATE_REDIS__CLUSTER_NODES='([^']+)'", text).group(1)
    assert all(int(a.split(":")[1]) in ports for a in json.loads(nodes))
    path = tmp_path / "rtgate.toml"
    path.write_text("")
    cfg = config_check(rtgate_bin, path, {"RTGATE_BROKER__KIND": "redis",
                                          "RTGATE_REDIS__CLUSTER_NODES": nodes})
    assert cfg["redis"]["cluster_nodes"] == json.loads(nodes)
