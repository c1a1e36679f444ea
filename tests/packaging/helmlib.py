"""The real Helm engine (helm-sdkpy bundles Helm v4 as a library), driven the
two ways the chart's tests need:

- lint(): Helm's linter on a copy of the chart whose values.yaml is the
  chart's defaults merged with the given values, the way `helm lint -f`
  would see them. Two traps of Helm v4's lint through this library: the
  returned messages keep severity and path but not their text, and a
  template's `fail` is not reported as an error at all, only logged on the
  process's stderr. So lint() captures fd 2 around the call and reports both.
- install() / upgrade(): Helm's Install and Upgrade actions against
  fakekube.FakeKube, which renders every template with the given values
  (through Helm's own value coalescing and schema validation) and submits
  every manifest; the test then reads what the API server received.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

# Helm's Kubernetes client allows 5 requests a second by default (bursts of
# 10); FakeKube answers at once. Read when the library loads.
os.environ.setdefault("HELM_QPS", "1000")
os.environ.setdefault("HELM_BURST_LIMIT", "1000")

import helm_sdkpy as helm  # noqa: E402

CHART = Path(__file__).resolve().parents[2] / "helm" / "xlb"
FAIL_LOG = re.compile(r'funcMap fail message="(.*)"\s*$')


class Stderr:
    """Captures everything written to fd 2 (Go's log goes there) meanwhile."""

    def __enter__(self) -> "Stderr":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


def merge(base, override, keep_null: bool = False):
    """Helm's coalescing for maps: override wins, maps merge, null deletes
    (keep_null: keep the nulls, for values that go to Helm as user values)."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    out = dict(base)
    for key, value in override.items():
        if value is None and not keep_null:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value, keep_null)
    return out


def set_value(values: dict, dotted: str, value) -> dict:
    """What `--set a.b.c=value` adds to the values."""
    out = values
    *path, last = dotted.split(".")
    for key in path:
        out = out.setdefault(key, {})
    out[last] = value
    return values


class LintResult:
    def __init__(self, result: dict, log: str) -> None:
        self.result = result
        self.log = log
        self.fails = [m.group(1).replace('\\"', '"') for m in map(FAIL_LOG.search, log.splitlines()) if m]
        # Severity: 1 info, 2 warning, 3 error (Helm's support.Severity).
        self.errors = [m["Path"] for m in (result.get("Messages") or []) if m.get("Severity", 0) >= 3]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.fails

    def __repr__(self) -> str:
        return f"LintResult(errors at {self.errors}, template fail messages {self.fails})"


def lint(values: dict | None = None, chart: Path = CHART) -> LintResult:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / chart.name
        shutil.copytree(chart, copy)
        defaults = yaml.safe_load((chart / "values.yaml").read_text()) or {}
        (copy / "values.yaml").write_text(yaml.safe_dump(merge(defaults, values or {}), sort_keys=False))
        cfg = helm.Configuration(namespace="xlb")
        with Stderr() as err:
            result = asyncio.run(helm.Lint(cfg).run(str(copy)))
        return LintResult(result, err.text)


def _config(kube, namespace: str) -> "helm.Configuration":
    return helm.Configuration(namespace=namespace, kubeconfig=kube.kubeconfig())


def install(kube, values: dict | None, release: str = "xlb", namespace: str = "xlb", chart: Path = CHART) -> dict:
    """`helm install RELEASE CHART -n NAMESPACE` with values. Raises
    helm_sdkpy's InstallError with Helm's message when Helm refuses.
    Without --create-namespace: Helm validates the Namespace it would create
    against the server's OpenAPI schema, which FakeKube does not serve; the
    namespace is no part of the chart."""
    with Stderr():
        return asyncio.run(
            helm.Install(_config(kube, namespace)).run(
                release, str(chart), values=values or None, create_namespace=False, wait=False, timeout=60
            )
        )


def upgrade(kube, values: dict | None, release: str = "xlb", namespace: str = "xlb", chart: Path = CHART) -> dict:
    """`helm upgrade RELEASE CHART -n NAMESPACE` with values (no --reuse-values)."""
    with Stderr():
        return asyncio.run(
            helm.Upgrade(_config(kube, namespace)).run(release, str(chart), values=values or None, wait=False, timeout=60)
        )
