"""A Kubernetes API server small enough to read, for Helm to install into.

It speaks the protocol Helm's client (client-go) uses: discovery (/version,
/api, /apis and each group version), typed CRUD on namespaced and cluster
objects with Status errors, label-selector lists, JSON merge and strategic
merge patches (applied as merge patches), and resourceVersion / uid /
creationTimestamp bookkeeping. It keeps every object in memory and records
every write, so a test can see exactly what `helm install` submitted.
Not a real apiserver: no admission, no validation beyond name and
namespace, no watch.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# group/version -> [(resource, kind, namespaced)]
RESOURCES = {
    "v1": [
        ("namespaces", "Namespace", False),
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("endpoints", "Endpoints", True),
        ("pods", "Pod", True),
        ("nodes", "Node", False),
    ],
    "apps/v1": [
        ("deployments", "Deployment", True),
        ("daemonsets", "DaemonSet", True),
        ("statefulsets", "StatefulSet", True),
        ("replicasets", "ReplicaSet", True),
    ],
    "rbac.authorization.k8s.io/v1": [
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    "discovery.k8s.io/v1": [("endpointslices", "EndpointSlice", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "batch/v1": [("jobs", "Job", True)],
}
VERSION = {"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"}

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


PROTOBUF_MAGIC = b"k8s\x00"


def _fields(buf: bytes):
    """Protocol buffer wire format -> [(field number, value)]; enough for
    the messages below (varints and length-delimited fields only)."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} not supported")
        out.append((num, value))
    return out


def _varint(buf: bytes, i: int):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _map(entries, decode_value):
    out = {}
    for raw in entries:
        kv = dict(_fields(raw))
        out[kv.get(1, b"").decode()] = decode_value(kv.get(2, b""))
    return out


def decode_protobuf(raw: bytes) -> dict:
    """The Kubernetes protobuf envelope around the one kind Helm sends that
    way (its Secret release records), as the JSON object it stands for."""
    unknown = dict(_fields(raw[len(PROTOBUF_MAGIC) :]))  # runtime.Unknown
    type_meta = dict(_fields(unknown.get(1, b"")))
    kind = type_meta.get(2, b"").decode()
    if kind != "Secret":
        raise ValueError(f"protobuf body for {kind!r}: only Secret is supported")
    secret = _fields(unknown.get(2, b""))
    meta_fields = _fields(next((v for n, v in secret if n == 1), b""))
    meta = {}
    for num, value in meta_fields:
        if num in (1, 3) and value:
            meta["name" if num == 1 else "namespace"] = value.decode()
    labels = _map([v for n, v in meta_fields if n == 11], bytes.decode)
    annotations = _map([v for n, v in meta_fields if n == 12], bytes.decode)
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    data = _map([v for n, v in secret if n == 2], lambda b: base64.b64encode(b).decode())
    out = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data}
    for num, value in secret:
        if num == 3:
            out["type"] = value.decode()
    return out


def merge_patch(target, patch):
    """RFC 7386; strategic merge patches are applied the same way (lists replace)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):  # strategic-merge directives
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict] = {}  # (gv, resource, ns, name)
        self.writes: list[tuple[str, str, dict | None]] = []  # (method, path, body)
        self.requests: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._rv = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> "FakeKube":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self) -> str:
        """As YAML text: helm-sdkpy tells a kubeconfig's text from a path by it."""
        return "\n".join(
            [
                "apiVersion: v1",
                "kind: Config",
                "clusters: [{name: fake, cluster: {server: '%s'}}]" % self.url,
                "users: [{name: fake, user: {token: fake}}]",
                "contexts: [{name: fake, context: {cluster: fake, user: fake}}]",
                "current-context: fake",
                "",
            ]
        )

    # -- what the tests read -------------------------------------------------

    def created(self) -> list[dict]:
        """Objects Helm created or updated, release records excluded."""
        return [
            o
            for (gv, res, ns, name), o in sorted(self.objects.items())
            if not (res == "secrets" and o.get("type") == "helm.sh/release.v1")
            and res != "namespaces"
        ]

    def release(self, name: str) -> dict:
        """The newest Helm release record (manifest, notes, config) for `name`."""
        records = [
            o
            for (gv, res, ns, n), o in self.objects.items()
            if res == "secrets" and o.get("type") == "helm.sh/release.v1" and o["metadata"]["labels"].get("name") == name
        ]
        if not records:
            raise KeyError(f"no release {name}")
        newest = max(records, key=lambda o: int(o["metadata"]["labels"]["version"]))
        raw = base64.b64decode(base64.b64decode(newest["data"]["release"]))
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw)

    # -- HTTP ----------------------------------------------------------------

    def _handler(self):
        kube = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, each
            # answer would wait for the client's delayed ACK (40 ms).
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                if raw.startswith(PROTOBUF_MAGIC):
                    return decode_protobuf(raw)
                return json.loads(raw) if raw.strip() else None

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except Exception as e:  # answer instead of dropping the connection
                    kube.errors.append(repr(e))
                    raise

            def do_GET(self):
                kube._dispatch(self, "GET")

            def do_POST(self):
                kube._dispatch(self, "POST")

            def do_PUT(self):
                kube._dispatch(self, "PUT")

            def do_PATCH(self):
                kube._dispatch(self, "PATCH")

            def do_DELETE(self):
                kube._dispatch(self, "DELETE")

        return Handler

    def _discovery(self, path: str):
        if path == "/version":
            return VERSION
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
            }
        if path == "/apis":
            groups = []
            for gv in RESOURCES:
                if "/" not in gv:
                    continue
                g, v = gv.split("/")
                ver = {"groupVersion": gv, "version": v}
                groups.append({"name": g, "versions": [ver], "preferredVersion": ver})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        gv = path[len("/api/") :] if path.startswith("/api/") else path[len("/apis/") :]
        if path in ("/api/v1",) or (path.startswith("/apis/") and gv in RESOURCES):
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": gv,
                "resources": [
                    {"name": r, "singularName": "", "namespaced": ns, "kind": k, "verbs": VERBS}
                    for r, k, ns in RESOURCES[gv]
                ],
            }
        return None

    def _parse(self, path: str):
        """-> (gv, resource, kind, namespace, name) or None."""
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"]:
            gv, rest = "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        if gv not in RESOURCES:
            return None
        kinds = {r: (k, nsd) for r, k, nsd in RESOURCES[gv]}
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in kinds:
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in kinds or len(rest) > 2:
            return None
        kind, namespaced = kinds[rest[0]]
        if namespaced and not ns:
            return (gv, rest[0], kind, None, rest[1] if len(rest) > 1 else "")
        return (gv, rest[0], kind, ns, rest[1] if len(rest) > 1 else "")

    def _dispatch(self, h, method: str) -> None:
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        self.requests.append((method, h.path))
        body = h._body() if method in ("POST", "PUT", "PATCH") else None
        if method == "GET":
            found = self._discovery(url.path)
            if found is not None:
                return h._send(200, found)
            if url.path.startswith("/openapi"):
                return h._send(404, _status(404, "NotFound", "no OpenAPI documents here"))
        target = self._parse(url.path)
        if target is None:
            return h._send(404, _status(404, "NotFound", f"the server could not find the requested resource ({url.path})"))
        gv, res, kind, ns, name = target
        with self._lock:
            if method in ("POST", "PUT", "PATCH", "DELETE"):
                self.writes.append((method, url.path, body))
            key = (gv, res, ns or "", name)
            details = {"name": name, "kind": res}
            if method == "GET" and not name:
                return h._send(200, self._list(gv, res, kind, ns, query))
            if method == "GET":
                if key not in self.objects:
                    return h._send(404, _status(404, "NotFound", f'{res} "{name}" not found', details))
                return h._send(200, self.objects[key])
            if method == "POST":
                if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
                    return h._send(422, _status(422, "Invalid", "metadata.name is required"))
                name = body["metadata"]["name"]
                key = (gv, res, ns or "", name)
                if ns and body["metadata"].get("namespace", ns) != ns:
                    return h._send(400, _status(400, "BadRequest", "the namespace of the object does not match the request"))
                if key in self.objects:
                    return h._send(
                        409, _status(409, "AlreadyExists", f'{res} "{name}" already exists', {"name": name, "kind": res})
                    )
                return h._send(201, self._store(key, body, kind, gv, ns, new=True))
            if key not in self.objects:
                return h._send(404, _status(404, "NotFound", f'{res} "{name}" not found', details))
            if method == "PUT":
                return h._send(200, self._store(key, body, kind, gv, ns, new=False))
            if method == "PATCH":
                merged = merge_patch(self.objects[key], body or {})
                return h._send(200, self._store(key, merged, kind, gv, ns, new=False))
            if method == "DELETE":
                del self.objects[key]
                return h._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": details})
        return h._send(405, _status(405, "MethodNotAllowed", method))

    def _store(self, key, obj: dict, kind: str, gv: str, ns, new: bool) -> dict:
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        old = self.objects.get(key, {}).get("metadata", {})
        obj.setdefault("apiVersion", gv)
        obj.setdefault("kind", kind)
        if ns:
            meta["namespace"] = ns
        meta["uid"] = old.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old.get("creationTimestamp") or "2026-01-01T00:00:00Z"
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[key] = obj
        return obj

    def _list(self, gv, res, kind, ns, query) -> dict:
        selector = {}
        for term in (query.get("labelSelector") or [""])[0].split(","):
            if "=" in term:
                k, v = term.split("=", 1)
                selector[k.rstrip("=").rstrip("!")] = v.lstrip("=")
        items = [
            o
            for (g, r, n, _), o in sorted(self.objects.items())
            if g == gv
            and r == res
            and (ns is None or n == ns)
            and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
        ]
        return {
            "kind": f"{kind}List",
            "apiVersion": gv,
            "metadata": {"resourceVersion": str(next(self._rv))},
            "items": items,
        }
