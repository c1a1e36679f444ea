"""Tests of helm/xlb through the real Helm engine (see helmlib.py).

Usage: python test_chart.py CASE [CASE ...]   (or `all`; `list` names them)
Environment: XLB_BIN, the xlb binary (`xlb check` judges rendered configs);
XLB_GUIDE, the user's guide (default: ../shared/seed-kubernetes-deployment.md
beside the repository). Prints `ok CASE` per case; exits 1 on the first failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fakekube  # noqa: E402
import helmlib  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "xlb"
GUIDE = Path(os.environ.get("XLB_GUIDE") or REPO.parent / "shared" / "seed-kubernetes-deployment.md")
QUICK_START = yaml.safe_load((CHART / "ci" / "quick-start-values.yaml").read_text())
COMPLETE = yaml.safe_load((CHART / "ci" / "complete-example-values.yaml").read_text())

GRACE_MESSAGE = "terminationGracePeriodSeconds ({grace}) must be greater than config.shutdown_timeout ({timeout})"
SERVICE_MESSAGE = "config.provider.kubernetes.service is required"

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# -- rendering ---------------------------------------------------------------


class Rendered:
    """One `helm install` into FakeKube: what Helm rendered and submitted."""

    def __init__(self, release: dict, kube: fakekube.FakeKube) -> None:
        self.release = release
        self.notes = release["info"].get("notes", "")
        self.manifests = [m for m in yaml.safe_load_all(release["manifest"]) if m]
        self.submitted = kube.created()
        self.writes = kube.writes

    def get(self, kind: str) -> dict:
        found = [m for m in self.manifests if m["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(m["kind"] for m in self.manifests)

    @property
    def pod(self) -> dict:
        return self.get("Deployment")["spec"]["template"]

    @property
    def container(self) -> dict:
        (c,) = [c for c in self.pod["spec"]["containers"] if c["name"] == "xlb"]
        return c

    @property
    def xlb_yaml_text(self) -> str:
        return self.get("ConfigMap")["data"]["xlb.yaml"]

    @property
    def xlb_yaml(self) -> dict:
        return yaml.safe_load(self.xlb_yaml_text)


def render(values: dict | None, namespace: str = "xlb") -> Rendered:
    with fakekube.FakeKube() as kube:
        release = helmlib.install(kube, values, namespace=namespace)
        assert not kube.errors, kube.errors
        return Rendered(release, kube)


def refused(values: dict | None) -> str:
    """Helm's error text for values the chart must refuse."""
    with fakekube.FakeKube() as kube:
        try:
            helmlib.install(kube, values)
        except helmlib.helm.HelmError as e:
            assert not [w for w in kube.writes if "/secrets" not in w[1]], "refused, yet objects were created"
            return str(e)
    raise AssertionError(f"helm install accepted values it must refuse: {values}")


def xlb_check(text: str) -> dict:
    """`xlb check` on a rendered xlb.yaml; returns the effective config."""
    xlb = os.environ.get("XLB_BIN") or str(REPO / "target" / "debug" / "xlb")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        run = subprocess.run([xlb, "check", "-c", f.name], capture_output=True, text=True)
    assert run.returncode == 0, f"xlb check refused the rendered xlb.yaml ({run.returncode}): {run.stderr}\n{text}"
    return yaml.safe_load(run.stdout)


def with_quick_start(values: dict) -> dict:
    return helmlib.merge(QUICK_START, values, keep_null=True)


def guide_snippets() -> list[tuple[str, dict]]:
    """(heading, values) for every ```yaml block of the guide's Configuration
    sections; the Complete Example's block is the one the ci/ file copies."""
    if not GUIDE.exists():
        return []
    heading, out = "", []
    for m in re.finditer(r"^(#+ [^\n]*)$|^```yaml\n(.*?)^```", GUIDE.read_text(), re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        else:
            out.append((heading, yaml.safe_load(m.group(2))))
    return out


def require_guide() -> bool:
    if GUIDE.exists():
        return True
    print(f"note: the guide is not at {GUIDE}; its snippets are not compared", file=sys.stderr)
    return False


# -- cases -------------------------------------------------------------------


@case
def lint_default_values():
    """The defaults are valid to Helm's linter but name no backend Service:
    rendering stops with the message that says which value to set."""
    res = helmlib.lint()
    assert not res.errors, f"lint errors with default values: {res}"
    assert len(res.fails) > 0 and all(SERVICE_MESSAGE in f for f in res.fails), res
    assert SERVICE_MESSAGE in refused(None)


@case
def lint_quick_start():
    """The guide's Quick Start: --set config.provider.kubernetes.service=my-backend-service."""
    res = helmlib.lint(QUICK_START)
    assert res.ok, f"lint of the quick-start values: {res}\n{res.log}"
    r = render(helmlib.set_value({}, "config.provider.kubernetes.service", "my-backend-service"))
    assert r.kinds() == ["ConfigMap", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"], r.kinds()
    assert r.xlb_yaml["provider"] == {"kubernetes": {"namespace": "default", "service": "my-backend-service"}}


@case
def lint_complete_example():
    """The guide's Complete Example values file, as `-f xlb-values.yaml`."""
    if require_guide():
        (block,) = [v for h, v in guide_snippets() if h == "Complete Example"]
        assert block == COMPLETE, "helm/xlb/ci/complete-example-values.yaml differs from the guide's Complete Example"
    res = helmlib.lint(COMPLETE)
    assert res.ok, f"lint of the Complete Example: {res}\n{res.log}"
    r = render(COMPLETE)
    dep, svc, cfg = r.get("Deployment"), r.get("Service"), r.xlb_yaml
    assert dep["spec"]["replicas"] == 2
    assert r.container["image"] == "emaczura/xlb:latest"
    assert r.pod["spec"]["terminationGracePeriodSeconds"] == 90
    assert r.container["resources"] == COMPLETE["resources"]
    assert svc["spec"]["type"] == "LoadBalancer" and "clusterIP" not in svc["spec"]
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["metadata"]["annotations"] == {
        "external-dns.alpha.kubernetes.io/hostname": "lb.example.com",
        "external-dns.alpha.kubernetes.io/ttl": "60",
    }
    assert [(p["port"], p["targetPort"], p["protocol"]) for p in svc["spec"]["ports"]] == [(80, 80, "TCP")]
    assert cfg["shutdown_timeout"] == 60 and cfg["listen"] == "auto" and cfg["proto"] == "tcp"
    assert cfg["ports"] == [{"local_port": 80, "remote_port": 8080}]
    assert cfg["otel"] == {
        "enabled": True,
        "endpoint": "http://opentelemetry-collector:4317",
        "protocol": "grpc",
        "export_interval_secs": 10,
        "headers": {},
        "headers_env": {},
    }
    assert cfg["provider"] == {"kubernetes": {"namespace": "default", "service": "backend-service"}}
    xlb_check(r.xlb_yaml_text)


@case
def guide_snippets_render():
    """Every values snippet in the guide, over the quick-start values, renders
    and does what the guide says it does."""
    if not require_guide():
        return
    snippets = guide_snippets()
    assert len(snippets) >= 8, f"expected the guide's values snippets, found {[h for h, _ in snippets]}"
    for heading, values in snippets:
        r = render(with_quick_start(values))
        effective = xlb_check(r.xlb_yaml_text)
        spec, cfg = r.pod["spec"], r.xlb_yaml
        if heading == "Backend Discovery":
            assert cfg["provider"]["kubernetes"] == {"namespace": "default", "service": "backend-service"}
            role = r.get("Role")
            assert role["metadata"]["namespace"] == "default"
        elif heading == "Port Mapping":
            assert effective["ports"] == values["config"]["ports"]
            ports = [(p["port"], p["targetPort"]) for p in r.get("Service")["spec"]["ports"]]
            assert ports == [(80, 80), (443, 443)], ports
        elif heading == "ExternalDNS Integration":
            svc = r.get("Service")
            assert svc["spec"]["type"] == "LoadBalancer"
            assert svc["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/ttl"] == "60"
        elif heading == "Graceful Shutdown":
            assert effective["shutdown_timeout"] == 60 and spec["terminationGracePeriodSeconds"] == 90
        elif heading == "Pod Anti-Affinity":
            assert spec["affinity"] == values["affinity"]
        elif heading == "Host Network Mode":
            assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        elif heading == "Resource Requirements":
            assert r.container["resources"] == values["resources"]
        elif heading == "OpenTelemetry Metrics":
            assert effective["otel"] == {**values["config"]["otel"], "headers_env": {}}, effective["otel"]
        elif heading == "Complete Example":
            pass  # lint_complete_example
        else:
            raise AssertionError(f"a guide snippet this test does not know: {heading}")


def key_paths(v, prefix=""):
    """Every mapping key path of a values tree (list items are not descended)."""
    if not isinstance(v, dict):
        return
    for k, x in v.items():
        yield prefix + k
        yield from key_paths(x, prefix + k + ".")


# Free-form maps: the guide fills them with the user's own keys.
FREE_FORM = ("service.annotations.", "affinity.", "config.otel.headers.")


@case
def values_list_every_key_the_guide_uses():
    """`helm show values` (values.yaml) names every key the guide's snippets
    set, so users find them documented with a default."""
    if not require_guide():
        return
    defaults = set(key_paths(yaml.safe_load(open(REPO / "helm" / "xlb" / "values.yaml"))))
    # "Host Network Mode" shows what the chart sets itself ("Automatically
    # configured in Helm chart"), not values.
    used = {
        p
        for heading, values in guide_snippets()
        if heading != "Host Network Mode"
        for p in key_paths(values)
        if not p.startswith(FREE_FORM)
    }
    missing = sorted(used - defaults)
    assert not missing, f"keys the guide uses that values.yaml does not list: {missing}"


@case
def pod_spec():
    """What the guide and the issue promise about the pod, with default values."""
    r = render(QUICK_START)
    spec, c = r.pod["spec"], r.container
    labels = r.pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "xlb", "kubectl logs -l app.kubernetes.io/name=xlb must find the pods"
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        {
            "labelSelector": {
                "matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["xlb"]}]
            },
            "topologyKey": "kubernetes.io/hostname",
        }
    ]
    assert c["args"] == ["run", "--config", "/etc/xlb/xlb.yaml"]
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["touch", "/tmp/shutdown"]
    ready = c["readinessProbe"]["exec"]["command"]
    assert ready[:2] == ["/bin/sh", "-c"] and ready[2].startswith("test ! -e /tmp/shutdown && curl -fsS"), ready
    assert ready[2].endswith("http://127.0.0.1:9090/readyz"), ready
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"host": "127.0.0.1", "path": "/healthz", "port": "admin"}, c[probe]
    assert {"name": "admin", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    assert env == {
        "K8S_POD_NAME": "metadata.name",
        "K8S_NAMESPACE_NAME": "metadata.namespace",
        "K8S_NODE_NAME": "spec.nodeName",
    }, env
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}, sc
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["config"]["mountPath"] == "/etc/xlb" and volumes["config"]["configMap"]["name"] == "xlb"
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    # Least privilege: of the node's bpffs only the instance's pin directory.
    assert r.xlb_yaml["name"] == "my-backend-service", "the instance is the name metrics already carry"
    assert host_paths(r) == {"/sys/fs/bpf/xlb/my-backend-service": "/sys/fs/bpf/xlb/my-backend-service"}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "initContainers" not in spec, "xlb sets its sysctls itself: no init container by default"
    assert not privileged_containers(r), "no container runs privileged by default"
    assert spec["serviceAccountName"] == r.get("ServiceAccount")["metadata"]["name"]
    assert spec["terminationGracePeriodSeconds"] > r.xlb_yaml["shutdown_timeout"]
    svc = r.get("Service")["spec"]
    assert svc["type"] == "ClusterIP" and svc["clusterIP"] == "None", "the default Service is headless"
    assert svc["selector"] == {"app.kubernetes.io/name": "xlb", "app.kubernetes.io/instance": "xlb"}
    assert svc["publishNotReadyAddresses"] is False
    # What reached the API server is what Helm rendered.
    assert sorted(o["kind"] for o in r.submitted) == r.kinds()


@case
def rbac_least_privilege():
    """A Role in the target namespace only: get/list/watch on endpointslices
    and endpoints, bound to the pods' ServiceAccount; nothing cluster-wide."""
    r = render(with_quick_start({"config": {"provider": {"kubernetes": {"namespace": "shop"}}}}), namespace="lb")
    role, binding, sa = r.get("Role"), r.get("RoleBinding"), r.get("ServiceAccount")
    assert role["metadata"]["namespace"] == "shop" and binding["metadata"]["namespace"] == "shop"
    rules = sorted((tuple(x["apiGroups"]), tuple(x["resources"]), tuple(sorted(x["verbs"]))) for x in role["rules"])
    assert rules == [(("",), ("endpoints",), ("get", "list", "watch")), (("discovery.k8s.io",), ("endpointslices",), ("get", "list", "watch"))], rules
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "lb"}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert not [k for k in r.kinds() if k.startswith("Cluster")]
    # Static backends need no API access at all.
    r = render({"config": {"provider": {"static": {"backends": [{"name": "a", "ip": "10.0.0.1"}]}}}})
    assert "Role" not in r.kinds() and "RoleBinding" not in r.kinds()
    assert r.xlb_yaml["provider"] == {"static": {"backends": [{"name": "a", "ip": "10.0.0.1"}]}}
    xlb_check(r.xlb_yaml_text)


@case
def refuses_short_grace_period():
    """terminationGracePeriodSeconds <= config.shutdown_timeout is refused,
    by lint (its log: see helmlib) and by install, with the message; one
    second more is accepted."""
    for grace, timeout in [(60, 60), (30, 60)]:
        values = with_quick_start({"terminationGracePeriodSeconds": grace, "config": {"shutdown_timeout": timeout}})
        message = GRACE_MESSAGE.format(grace=grace, timeout=timeout)
        res = helmlib.lint(values)
        assert [f for f in res.fails if message in f], f"lint did not refuse grace {grace} <= {timeout}: {res}"
        assert message in refused(values)
    # xlb's own default shutdown_timeout (15) counts when the key is removed.
    values = with_quick_start({"terminationGracePeriodSeconds": 15, "config": {"shutdown_timeout": None}})
    assert GRACE_MESSAGE.format(grace=15, timeout=15) in refused(values)
    values = with_quick_start({"terminationGracePeriodSeconds": 61, "config": {"shutdown_timeout": 60}})
    assert helmlib.lint(values).ok
    render(values)


@case
def refuses_bad_values():
    """values.schema.json: keys xlb does not know and values it refuses stop
    the install before anything is rendered."""
    cases = [
        ({"config": {"shutdown_timout": 30}}, "shutdown_timout"),
        ({"config": {"otel": {"enabeld": True}}}, "enabeld"),
        ({"config": {"ports": [{"local_port": 70000, "remote_port": 80}]}}, "/config/ports/0/local_port"),
        ({"config": {"admin": {"address": "10.0.0.1"}}}, "/config/admin/address"),
        ({"config": {"proto": "udp"}}, "/config/proto"),
        ({"config": {"health_check": {"type": "udp"}}}, "/config/health_check/type"),
        ({"config": {"health_check": {"interval": 100}}}, "interval"),
        ({"config": {"health_check": {"expect_status": "2xx"}}}, "/config/health_check/expect_status"),
        ({"config": {"health_check": {"fall": 0}}}, "/config/health_check/fall"),
        ({"config": {"passive_health": {"syn_timeout": 1000}}}, "syn_timeout"),
        ({"config": {"passive_health": {"syn_timeout_ms": 99}}}, "/config/passive_health/syn_timeout_ms"),
        ({"config": {"passive_health": {"syn_timeout_ms": 20001}}}, "/config/passive_health/syn_timeout_ms"),
        ({"config": {"passive_health": {"fall": 0}}}, "/config/passive_health/fall"),
        ({"config": {"passive_health": {"fall": 101}}}, "/config/passive_health/fall"),
        ({"config": {"passive_health": {"rst_on_syn": "yes"}}}, "/config/passive_health/rst_on_syn"),
        # The chart renders an empty mapping as absent: refused, not dropped.
        ({"config": {"passive_health": {}}}, "/config/passive_health"),
        ({"service": {"type": "NodePort"}}, "/service/type"),
        ({"terminationGracePeriod": 90}, "terminationGracePeriod"),
        ({"hostNetwork": False}, "/hostNetwork"),
    ]
    for values, needle in cases:
        message = refused(with_quick_start(values))
        assert "schema" in message and needle in message, f"{values}: {message}"
        assert "values.yaml" in helmlib.lint(with_quick_start(values)).errors, values
    both = {"config": {"provider": {"static": {"backends": [{"name": "a", "ip": "10.0.0.1"}]}}}}
    assert "set exactly one" in refused(with_quick_start(both))


@case
def config_keys_match_xlb():
    """values.schema.json's `config` allows exactly the keys xlb's config has:
    a key xlb gains must reach the chart, and the chart must never render a
    key xlb refuses. The key tree comes from `xlb check` (every key, unset
    ones as null)."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    base = {"ports": [{"local_port": 80, "remote_port": 8080}], "name": "x", "interfaces": ["eth0"], "snat_ip": "10.0.0.5", "health_check": {"type": "http"}, "passive_health": {}}
    trees = [
        xlb_check(yaml.safe_dump({**base, "provider": {"kubernetes": {"service": "web"}}})),
        xlb_check(yaml.safe_dump({**base, "provider": {"static": {"backends": [{"name": "a", "ip": "10.0.0.1"}]}}})),
    ]

    def compare(path: str, value, node: dict) -> None:
        if isinstance(value, list) and value and "items" in node:
            compare(path + "[]", value[0], node["items"])
        if not isinstance(value, dict) or "properties" not in node:
            return
        allowed = set(node["properties"])
        if path == "config.provider":
            assert set(value) <= allowed, f"{path}: xlb has {sorted(value)}, the schema {sorted(allowed)}"
        else:
            assert set(value) == allowed, (
                f"{path}: keys only in xlb: {sorted(set(value) - allowed)}; only in the chart's schema: {sorted(allowed - set(value))}"
            )
        for key, sub in value.items():
            compare(f"{path}.{key}", sub, node["properties"][key])

    for tree in trees:
        compare("config", tree, schema)


@case
def rendered_config_passes_xlb_check():
    """The ConfigMap's xlb.yaml, for the values users will give, is accepted
    by `xlb check`, and the chart's choices reach xlb."""
    variants = [
        QUICK_START,
        COMPLETE,
        with_quick_start({"config": {"listen": {"ip": "192.0.2.10"}, "interfaces": ["eth0", "eth1"], "name": "edge"}}),
        with_quick_start({"config": {"admin": {"address": "0.0.0.0", "port": 9191}, "shutdown_file": "/tmp/drain"}}),
        with_quick_start({"config": {"otel": {"enabled": True, "protocol": "http", "headers": {"Authorization": "Bearer t"}}}}),
        with_quick_start({"config": {"health_check": {"type": "http", "path": "/healthz", "expect_status": "200-299", "interval_ms": 500, "timeout_ms": 200}}}),
        with_quick_start({"config": {"health_check": {"type": "tcp", "fall": 2}}}),
        with_quick_start({"config": {"passive_health": {"syn_timeout_ms": 3000, "rst_on_syn": False, "fall": 10}}}),
        with_quick_start({"config": {"health_check": {"type": "tcp"}, "passive_health": {"fall": 3}}}),
    ]
    for values in variants:
        r = render(values)
        effective = xlb_check(r.xlb_yaml_text)
        admin = values["config"].get("admin", {})
        got = (effective["admin"]["address"], effective["admin"]["port"])
        assert got == (admin.get("address", "127.0.0.1"), admin.get("port", 9090)), effective["admin"]
        shutdown_file = values["config"].get("shutdown_file", "/tmp/shutdown")
        assert effective["shutdown_file"] == shutdown_file
        assert r.container["lifecycle"]["preStop"]["exec"]["command"] == ["touch", shutdown_file]
        assert f"test ! -e {shutdown_file} &&" in r.container["readinessProbe"]["exec"]["command"][2]
        assert {"name": "admin", "containerPort": admin.get("port", 9090), "protocol": "TCP"} in r.container["ports"]
        passive = values["config"].get("passive_health")
        if passive is not None:
            assert r.xlb_yaml["passive_health"] == passive, r.xlb_yaml_text
            want = {"syn_timeout_ms": 1000, "rst_on_syn": True, "fall": 5, **passive}
            assert effective["passive_health"] == want, effective["passive_health"]


@case
def admin_auth_password_from_secret():
    """config.admin.auth reaches xlb; its password comes from a Secret via
    extraEnv, never through the ConfigMap; the probes' paths stay open."""
    secret = {"name": "XLB_ADMIN_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "xlb-admin", "key": "password"}}}
    r = render(with_quick_start({"config": {"admin": {"auth": {"username": "ops"}}}, "extraEnv": [secret]}))
    effective = xlb_check(r.xlb_yaml_text)
    assert effective["admin"]["auth"] == {"username": "ops", "password_env": "XLB_ADMIN_PASSWORD"}, effective["admin"]
    assert secret in r.container["env"], r.container["env"]
    assert "password" not in r.xlb_yaml_text
    assert "schema" in refused(with_quick_start({"config": {"admin": {"auth": {"username": "a:b"}}}}))


@case
def upgrade_set_env_keeps_provider():
    """The guide's `helm upgrade xlb ./helm/xlb -n xlb --set env.RUST_LOG=debug`
    (no --reuse-values, so Helm starts from the chart's defaults) after the
    quick-start install: xlb gets RUST_LOG=debug and keeps its backends."""
    with fakekube.FakeKube() as kube:
        helmlib.install(kube, QUICK_START)
        release = helmlib.upgrade(kube, helmlib.set_value({}, "env.RUST_LOG", "debug"))
        assert release["version"] == 2
        r = Rendered(release, kube)
    env = {e["name"]: e.get("value") for e in r.container["env"]}
    assert env.get("RUST_LOG") == "debug", env
    assert r.xlb_yaml["provider"] == {"kubernetes": {"namespace": "default", "service": "my-backend-service"}}
    assert "Role" in r.kinds()
    # Without a running release there is nothing to keep: the same values fail.
    assert SERVICE_MESSAGE in refused(helmlib.set_value({}, "env.RUST_LOG", "debug"))


@case
def notes_and_readme():
    """NOTES.txt tells how to check XDP attachment and discovered backends,
    as the guide's troubleshooting does; the chart README explains the
    Service model."""
    r = render(QUICK_START)
    for line in [
        "kubectl exec -n xlb <pod-name> -- ip link show | grep xdp",
        "kubectl logs -n xlb -l app.kubernetes.io/name=xlb | grep backend",
        "--set env.RUST_LOG=debug",
    ]:
        assert line in r.notes, f"NOTES.txt lacks: {line}\n{r.notes}"
    assert "LoadBalancer" not in r.notes
    lb = render(COMPLETE)
    assert "service.type is LoadBalancer" in lb.notes
    readme = (CHART / "README.md").read_text()
    for needle in ["## The Service model", "headless", "LoadBalancer", "ExternalDNS", "terminationGracePeriodSeconds"]:
        assert needle in readme, f"helm/xlb/README.md lacks {needle!r}"


def host_paths(r: Rendered) -> dict[str, str]:
    """hostPath volumes of the pod: node path -> where the xlb container
    mounts it; every one is mounted, and only by xlb."""
    spec = r.pod["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    out = {}
    for container in spec.get("initContainers", []) + spec["containers"]:
        for m in container.get("volumeMounts", []):
            if "hostPath" in volumes[m["name"]]:
                assert container["name"] == "xlb", f"{container['name']} mounts a hostPath: {m}"
                out[volumes[m["name"]]["hostPath"]["path"]] = m["mountPath"]
    assert len(out) == sum("hostPath" in v for v in volumes.values()), "a hostPath volume no container mounts"
    return out


def privileged_containers(r: Rendered) -> list[str]:
    spec = r.pod["spec"]
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]
            if (c.get("securityContext") or {}).get("privileged")]


@case
def pin_directory_only():
    """The pod mounts the instance's pin directory (DirectoryOrCreate, at the
    same path, host mounts propagating in) and nothing else of the node's
    bpffs; the runtime makes its mount point in an emptyDir at /sys/fs/bpf,
    since a container's /sys is a read-only sysfs. The instance follows
    config.name, else the provider's Service, else xlb."""
    r = render(QUICK_START)
    spec, c = r.pod["spec"], r.container
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    pins = mounts["/sys/fs/bpf/xlb/my-backend-service"]
    assert volumes[pins["name"]]["hostPath"] == {"path": "/sys/fs/bpf/xlb/my-backend-service", "type": "DirectoryOrCreate"}
    assert pins["mountPropagation"] == "HostToContainer" and not pins.get("readOnly")
    assert "emptyDir" in volumes[mounts["/sys/fs/bpf"]["name"]], "no writable place for the mount point"
    assert [p for p in mounts if p.startswith("/sys")] == ["/sys/fs/bpf", "/sys/fs/bpf/xlb/my-backend-service"]
    named = render(with_quick_start({"config": {"name": "edge-1"}}))
    assert named.xlb_yaml["name"] == "edge-1" and host_paths(named) == {"/sys/fs/bpf/xlb/edge-1": "/sys/fs/bpf/xlb/edge-1"}
    static = render({"config": {"provider": {"static": {"backends": [{"name": "a", "ip": "10.0.0.9"}]}}}})
    assert static.xlb_yaml["name"] == "xlb" and host_paths(static) == {"/sys/fs/bpf/xlb/xlb": "/sys/fs/bpf/xlb/xlb"}
    for text in (r.xlb_yaml_text, named.xlb_yaml_text, static.xlb_yaml_text):
        xlb_check(text)
    assert "name" in refused(with_quick_start({"config": {"name": "Not_A_Label"}}))


@case
def seccomp_profile():
    """RuntimeDefault unless told otherwise; Localhost needs the profile's
    path; the shipped Localhost profile is the systemd unit's
    SystemCallFilter (@system-service and bpf), refusing the rest with EPERM
    as the unit's SystemCallErrorNumber does."""
    spec = render(QUICK_START).pod["spec"]
    assert spec["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    local = {"type": "Localhost", "localhostProfile": "xlb.json"}
    spec = render(with_quick_start({"seccompProfile": local})).pod["spec"]
    assert spec["securityContext"]["seccompProfile"] == local
    assert "securityContext" not in render(with_quick_start({"seccompProfile": None})).pod["spec"]
    assert "localhostProfile" in refused(with_quick_start({"seccompProfile": {"type": "Localhost"}}))
    refused(with_quick_start({"seccompProfile": {"type": "Strict"}}))

    profile = json.loads((CHART / "files" / "seccomp-xlb.json").read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1, profile
    assert "architectures" not in profile, "native only, as the unit's SystemCallArchitectures=native"
    (rule,) = profile["syscalls"]
    assert rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
    unit = {}
    for line in (REPO / "config" / "xlb.service").read_text().splitlines():
        key, _, value = line.partition("=")
        unit[key.strip()] = value.strip()
    assert unit["SystemCallErrorNumber"] == "EPERM"
    want = systemd_syscalls(unit["SystemCallFilter"].split())
    got = set(rule["names"])
    assert got == want, f"not in the profile: {sorted(want - got)}; not in the unit: {sorted(got - want)}"
    assert rule["names"] == sorted(got), "keep the names sorted"


def systemd_syscalls(filters: list[str]) -> set[str]:
    """A SystemCallFilter's system calls, groups expanded by systemd-analyze."""
    names: set[str] = set()
    for f in filters:
        if not f.startswith("@"):
            names.add(f)
            continue
        text = subprocess.run(["systemd-analyze", "syscall-filter", f], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines()[1:]:
            word = line.strip()
            if word and not word.startswith("#"):
                names |= systemd_syscalls([word]) if word.startswith("@") else {word}
    return names


@case
def privileged_fallback():
    """securityContext.privileged: true is the opt-in fallback; the chart
    drops what Kubernetes refuses next to it."""
    r = render(with_quick_start({"securityContext": {"privileged": True}}))
    sc = r.container["securityContext"]
    assert sc["privileged"] is True and "allowPrivilegeEscalation" not in sc and "capabilities" not in sc, sc
    r = render(with_quick_start({"nodePrep": {"enabled": False}}))
    assert "initContainers" not in r.pod["spec"]
    # The deprecated init container still comes when asked for.
    r = render(with_quick_start({"nodePrep": {"enabled": True}}))
    (init,) = r.pod["spec"]["initContainers"]
    assert init["securityContext"] == {"privileged": True} and init["command"] == ["/bin/sh", "/etc/xlb/prepare-node.sh"]
    assert privileged_containers(r) == ["prepare-node"] and list(host_paths(r)) == ["/sys/fs/bpf/xlb/my-backend-service"]
    assert "prepare-node.sh" in r.get("ConfigMap")["data"]
    assert "prepare-node.sh" not in render(QUICK_START).get("ConfigMap")["data"]


def main(argv: list[str]) -> int:
    names = argv or ["all"]
    if names == ["list"]:
        print("\n".join(CASES))
        return 0
    if names == ["all"]:
        names = list(CASES)
    for name in names:
        if name not in CASES:
            print(f"unknown case {name}; known: {', '.join(CASES)}", file=sys.stderr)
            return 2
        try:
            CASES[name]()
        except Exception as e:
            print(f"FAILED {name}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"ok {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
