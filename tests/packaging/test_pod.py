"""Runs xlb the way the chart's pod does, without a kubelet, on test hosts in
network namespaces (scripts/topology.sh): a client, the XLB node, a backend.

From a config rendered by the real Helm engine it takes the ConfigMap
(xlb.yaml, prepare-node.sh), the xlb container's args, capabilities, volume
mounts, readiness probe and preStop hook, and checks the pod's life:
  1. like a container, xlb sees /proc/sys read-only and holds only the
     chart's capabilities, with no init container before it: it sets the
     net.ipv4.conf values it needs itself (over rtnetlink), starts and gets
     ready;
  2. of the node's bpffs it sees its own pin directory alone, mounted as
     the pod spec says, and pins there;
  3. a client's request crosses XLB to the backend;
  4. the preStop hook's file makes the readiness probe fail at once; after
     SIGTERM (which the kubelet sends after preStop) xlb exits 0 within
     terminationGracePeriodSeconds.
Also: the deprecated init container's prepare-node.sh picks the interfaces
xlb uses for listen: auto and listen.ip.

Usage: python test_pod.py [lifecycle|interface_choice|systemd_unit|all];
needs root, XLB_BIN (the xlb binary) and XLB_TEST_TMPDIR (scratch space).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_chart  # noqa: E402

REPO = test_chart.REPO
TOPOLOGY = REPO / "scripts" / "topology.sh"
CONF = "/proc/sys/net/ipv4/conf"


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({run.returncode}): {run.stdout}{run.stderr}")
    return run


class Topology:
    def __init__(self) -> None:
        self.prefix = f"xp{os.getpid() & 0xFFFFF:x}"
        self.lb, self.client, self.backend = f"{self.prefix}-lb", f"{self.prefix}-client", f"{self.prefix}-be1"

    def __enter__(self) -> "Topology":
        sh(str(TOPOLOGY), "up", self.prefix, "1")
        return self

    def __exit__(self, *exc) -> None:
        sh(str(TOPOLOGY), "down", self.prefix, check=False)

    def ns(self, ns: str, *argv: str, **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *argv, **kw)

    def conf(self, ifname: str, key: str) -> str:
        return self.ns(self.lb, "cat", f"{CONF}/{ifname}/{key}").stdout.strip()

    def set_conf(self, ifname: str, key: str, value: str) -> None:
        self.ns(self.lb, "sh", "-c", f"echo {value} > {CONF}/{ifname}/{key}")


def pod_values(extra: dict | None = None) -> dict:
    values = {
        "config": {
            "listen": {"ip": "10.100.0.1"},
            "interfaces": ["lb-client", "lb-be1"],
            "provider": {"static": {"backends": [{"name": "be1", "ip": "10.101.0.2"}]}},
            "shutdown_timeout": 2,
        },
        "terminationGracePeriodSeconds": 10,
    }
    return test_chart.helmlib.merge(values, extra or {})


def init_env(r: test_chart.Rendered) -> dict:
    (init,) = r.pod["spec"]["initContainers"]
    assert init["command"] == ["/bin/sh", "/etc/xlb/prepare-node.sh"], init["command"]
    return {e["name"]: e["value"] for e in init["env"]}


def run_prepare(topo: Topology, r: test_chart.Rendered, workdir: Path, env: dict | None = None) -> str:
    script = workdir / "prepare-node.sh"
    script.write_text(r.get("ConfigMap")["data"]["prepare-node.sh"])
    env = {**os.environ, **(init_env(r) if env is None else env)}
    return topo.ns(topo.lb, "/bin/sh", str(script), env=env).stdout


class Pod:
    """The xlb container, its mounts made from the rendered pod spec as a
    runtime would: /proc/sys read-only, a read-only sysfs at /sys, each
    emptyDir a tmpfs, each hostPath bound from the node (the kubelet makes a
    missing DirectoryOrCreate path first), the mount points made by mkdir in
    what is mounted so far, parents before children. The node's bpffs (as
    systemd mounts it: root's, mode 0700) is a fresh instance here, out of
    the container's sight like the host's is. The process
    keeps only the chart's capabilities, with no_new_privs
    (allowPrivilegeEscalation: false)."""

    def __init__(self, topo: Topology, r: test_chart.Rendered, workdir: Path) -> None:
        c = r.container
        config = workdir / "xlb.yaml"
        config.write_text(r.xlb_yaml_text)

        # The pod's /tmp is its own tmpfs; what this test keeps under the
        # host's /tmp (a checkout there, say) stays reachable through /mnt,
        # bound in the pod's mount namespace only.
        def visible(path) -> str:
            path = str(Path(path).resolve())
            return "/mnt" + path[len("/tmp") :] if path == "/tmp" or path.startswith("/tmp/") else path

        args = [visible(config) if a == "/etc/xlb/xlb.yaml" else a for a in c["args"]]
        assert args != c["args"], "the container no longer reads /etc/xlb/xlb.yaml"
        sc = c["securityContext"]
        caps = ",".join("+" + cap.lower() for cap in sc["capabilities"]["add"])
        setpriv = ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all"]
        if sc.get("allowPrivilegeEscalation") is False:
            setpriv.append("--no-new-privs")
        xlb = visible(os.environ.get("XLB_BIN") or str(REPO / "target" / "debug" / "xlb"))

        volumes = {v["name"]: v for v in r.pod["spec"]["volumes"]}
        node, container = [], []
        stage = workdir / "hostpaths"
        for m in sorted(c["volumeMounts"], key=lambda m: len(Path(m["mountPath"]).parts)):
            v, path = volumes[m["name"]], m["mountPath"]
            if "configMap" in v:
                continue  # xlb.yaml is passed by its path above
            if "emptyDir" in v:
                # /tmp first moves aside to /mnt (see visible()).
                prefix = "mount --rbind /tmp /mnt && " if path == "/tmp" else f"mkdir -p {path} && "
                container.append(f"{prefix}mount -t tmpfs -o size=1m tmpfs {path}")
            elif "hostPath" in v:
                host = v["hostPath"]["path"]
                assert host.startswith("/sys/fs/bpf/"), f"a hostPath this test does not emulate: {v}"
                made = "mkdir -p" if v["hostPath"].get("type") == "DirectoryOrCreate" else "test -d"
                staged = stage / m["name"]
                staged.mkdir(parents=True)
                # The node's view is the host's /tmp; the container's has it at /mnt.
                node.append(f"{made} {host} && mount --bind {host} {staged.resolve()}")
                container.append(f"mkdir -p {path} && mount --bind {visible(staged)} {path}")
            else:
                raise AssertionError(f"a volume this test does not emulate: {v}")
        inner = " && ".join(
            [
                "mount --make-rprivate /",
                "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys",
                "mount -t bpf -o mode=0700 bpf /sys/fs/bpf",
                *node,
                # The container's /sys: read-only, without the node's bpffs.
                "umount /sys/fs/bpf && mount -o remount,bind,ro /sys",
                *container,
                'exec "$@"',
            ]
        )
        self.log = open(workdir / "xlb.log", "w+")
        env = {**os.environ, **{k: str(v) for k, v in (r.release["config"].get("env") or {}).items()}}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.lb, "unshare", "-m", "sh", "-c", inner, "pod", *setpriv, "--", xlb, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def exec(self, argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess:
        """Like `kubectl exec` / the kubelet's exec probes: in the pod's namespaces."""
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-n", "-m", "--", *argv], capture_output=True, text=True, timeout=timeout
        )

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def lifecycle() -> None:
    r = test_chart.render(pod_values())
    assert "initContainers" not in r.pod["spec"], "the default pod has no init container"
    ready = r.container["readinessProbe"]["exec"]["command"]
    pre_stop = r.container["lifecycle"]["preStop"]["exec"]["command"]
    grace = r.pod["spec"]["terminationGracePeriodSeconds"]
    pins = f"/sys/fs/bpf/xlb/{r.xlb_yaml['name']}"
    with Topology() as topo, tempfile.TemporaryDirectory(dir=os.environ.get("XLB_TEST_TMPDIR")) as tmp:
        workdir = Path(tmp)
        # What a node may well start with: forwarding off, accept_local off,
        # strict reverse-path filtering.
        for ifname in ("lb-client", "lb-be1"):
            topo.set_conf(ifname, "forwarding", "0")
            topo.set_conf(ifname, "accept_local", "0")
        topo.set_conf("lb-client", "rp_filter", "1")
        topo.set_conf("all", "rp_filter", "1")

        server = subprocess.Popen(
            ["ip", "netns", "exec", topo.backend, "/usr/bin/python3", "-m", "http.server", "8080", "--bind", "10.101.0.2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pod = Pod(topo, r, workdir)
        try:
            # 1. The container starts, sets what the kernel needs on its
            # interfaces itself (its /proc/sys is read-only: over rtnetlink)
            # and gets ready.
            deadline = time.monotonic() + 20
            while pod.exec(ready).returncode != 0:
                assert pod.proc.poll() is None, f"xlb exited:\n{pod.output()}"
                assert time.monotonic() < deadline, f"readiness probe never passed:\n{pod.output()}"
                time.sleep(0.2)
            got = {(i, k): topo.conf(i, k) for i in ("lb-client", "lb-be1") for k in ("forwarding", "accept_local")}
            got[("lb-client", "rp_filter")] = topo.conf("lb-client", "rp_filter")
            want = {key: ("2" if key[1] == "rp_filter" else "1") for key in got}
            assert got == want, f"sysctls xlb set: {got}\n{pod.output()}"
            assert topo.conf("all", "rp_filter") == "1", "conf.all.rp_filter changed: only the interfaces' are xlb's"
            assert "sysctl net.ipv4.conf.lb-client.forwarding 0 -> 1" in pod.output(), pod.output()
            probe = pod.exec(["sh", "-c", "echo x > /proc/sys/net/ipv4/conf/lb-client/forwarding"])
            assert probe.returncode != 0 and "Read-only file system" in probe.stderr, f"/proc/sys is writable: {probe}"

            # 2. Of the node's bpffs the container sees its pin directory alone.
            assert f"pinned in {pins}" in pod.output(), f"xlb pinned nothing:\n{pod.output()}"
            fs = pod.exec(["stat", "-f", "-c", "%T", "/sys/fs/bpf", pins]).stdout.split()
            assert fs == ["tmpfs", "bpf_fs"], fs
            assert pod.exec(["ls", "/sys/fs/bpf/xlb"]).stdout.split() == [r.xlb_yaml["name"]]
            pinned = pod.exec(["ls", pins]).stdout.split()
            assert "map_conntrack" in pinned and "link_lb-client" in pinned, pinned

            for _ in range(50):
                got = topo.ns(topo.client, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                              "http://10.100.0.1/", check=False)
                if got.stdout == "200":
                    break
                time.sleep(0.1)
            assert got.stdout == "200", f"request through XLB: {got.stdout!r} {got.stderr}\n{pod.output()}"

            # 3. preStop, then SIGTERM, as the kubelet does; the pins go, the
            # mounted directory stays.
            assert pod.exec(pre_stop).returncode == 0
            assert pod.exec(ready).returncode != 0, "readiness still passes after the preStop hook"
            started = time.monotonic()
            pod.proc.terminate()
            code = pod.wait(grace)
            assert code == 0, f"xlb did not exit 0 within terminationGracePeriodSeconds ({grace}s): {code}\n{pod.output()}"
            print(f"xlb exited 0 {time.monotonic() - started:.1f}s after SIGTERM (grace period {grace}s)")
        finally:
            pod.kill()
            server.kill()
            server.wait()


def interface_choice() -> None:
    """prepare-node.sh finds the interfaces xlb will use: config.interfaces,
    else the one holding listen.ip, else the default route's."""
    r = test_chart.render(pod_values({"nodePrep": {"enabled": True}}))
    with Topology() as topo, tempfile.TemporaryDirectory(dir=os.environ.get("XLB_TEST_TMPDIR")) as tmp:
        workdir = Path(tmp)
        topo.ns(topo.lb, "ip", "route", "add", "default", "via", "10.101.0.2", "dev", "lb-be1")

        def fresh():
            for ifname in ("lb-client", "lb-be1"):
                topo.set_conf(ifname, "accept_local", "0")

        fresh()
        out = run_prepare(topo, r, workdir, {"XLB_INTERFACES": "", "XLB_LISTEN_IP": "10.100.0.1"})
        assert "ready: lb-client\n" in out and topo.conf("lb-be1", "accept_local") == "0", out
        fresh()
        out = run_prepare(topo, r, workdir, {"XLB_INTERFACES": "", "XLB_LISTEN_IP": ""})
        assert "ready: lb-be1\n" in out and topo.conf("lb-client", "accept_local") == "0", out
        bad = topo.ns(topo.lb, "/bin/sh", str(workdir / "prepare-node.sh"), check=False,
                      env={**os.environ, "XLB_INTERFACES": "", "XLB_LISTEN_IP": "10.9.9.9"})
        assert bad.returncode != 0 and "no interface holds 10.9.9.9" in bad.stderr, bad
        # The rendered environment carries config.listen.ip and config.interfaces.
        auto = test_chart.render(pod_values({"config": {"listen": "auto", "interfaces": None}, "nodePrep": {"enabled": True}}))
        assert init_env(auto) == {"XLB_INTERFACES": "", "XLB_LISTEN_IP": ""}
        assert init_env(r) == {"XLB_INTERFACES": "lb-client lb-be1", "XLB_LISTEN_IP": "10.100.0.1"}


def unit_directives(path: Path) -> dict[str, list[str]]:
    """A systemd unit's [Service] settings: key -> values, in order."""
    out: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit_command(line: str) -> str:
    """An Exec line as the shell text systemd would run: prefixes dropped,
    `$$` (systemd's escape for `$`) unescaped."""
    return line.lstrip("+-@:!").replace("$$", "$")


def syscall_set(filters: list[str]) -> set[str]:
    names: set[str] = set()
    for f in " ".join(filters).split():
        if f.startswith("@"):
            text = sh("systemd-analyze", "syscall-filter", f).stdout
            names |= {w for w in text.split() if w and not w.startswith(("#", "@"))}
            for group in {w for w in text.split() if w.startswith("@")} - {f}:
                names |= syscall_set([group])
        else:
            names.add(f)
    return names


def systemd_unit() -> None:
    """config/xlb.service as systemd would run it, minus systemd (none runs
    here): xlb as uid 0 with the unit's SecureBits (so uid 0 confers
    nothing) holding only the unit's ambient capabilities, no_new_privs, a
    0700 bpffs to pin in (the host's /proc/sys stays writable, as under
    ProtectSystem=strict), traced with strace. ExecStartPost returns once xlb
    is ready; ExecReload (check, then SIGHUP) keeps it running and ready;
    SIGTERM ends it with 0 within TimeoutStopSec; and every system call it
    made is allowed by the unit's SystemCallFilter."""
    unit = unit_directives(REPO / "config" / "xlb.service")
    caps = [c.removeprefix("CAP_").lower() for c in unit["AmbientCapabilities"][0].split()]
    assert unit["CapabilityBoundingSet"][0].split() == unit["AmbientCapabilities"][0].split()
    env = dict(kv.split("=", 1) for line in unit["Environment"] for kv in line.split())
    r = test_chart.render(pod_values({"config": {"shutdown_timeout": 1}}))
    # Without CAP_DAC_OVERRIDE even uid 0 needs the files' own permissions:
    # copies in a fresh directory, wherever the checkout is and whoever owns it.
    with Topology() as topo, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        xlb = str(workdir / "xlb")
        shutil.copy(os.environ.get("XLB_BIN") or REPO / "target" / "debug" / "xlb", xlb)
        config = workdir / "xlb.yaml"
        config.write_text(r.xlb_yaml_text)
        config.chmod(0o644)
        env.update(XLB_CONFIG=str(config))
        start = unit_command(unit["ExecStart"][0]).replace("/usr/local/bin/xlb", xlb)
        start = start.replace("${XLB_CONFIG}", str(config)).replace("$XLB_ARGS", "").split()
        trace = workdir / "strace"
        log = open(workdir / "xlb.log", "w+")
        cap_list = ",".join("+" + c for c in caps)
        assert unit.get("User", ["root"]) == ["root"], unit.get("User")
        # SecureBits=noroot noroot-locked: uid 0 confers no capability.
        bits = unit["SecureBits"][0].split()
        securebits = ["--securebits=" + ",".join("+" + b.replace("-", "_") for b in bits)]
        # A fresh bpffs (root's, 0700, as systemd mounts it) in a private
        # mount namespace: xlb must pin there.
        inner = 'mount --make-rprivate / && mount -t bpf -o mode=0700 bpf /sys/fs/bpf && exec "$@"'
        proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.lb, "unshare", "-m", "sh", "-c", inner, "unit",
             "strace", "-f", "-qq", "-o", str(trace), "--",
             "setpriv", *securebits, f"--inh-caps=-all,{cap_list}",
             f"--ambient-caps=-all,{cap_list}", f"--bounding-set=-all,{cap_list}", "--no-new-privs", "--", *start],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )

        def in_ns(cmd: str, timeout: float) -> subprocess.CompletedProcess:
            return subprocess.run(["ip", "netns", "exec", topo.lb, "/bin/sh", "-c", cmd], capture_output=True,
                                  text=True, timeout=timeout, env={**os.environ, **env})

        def output() -> str:
            log.flush()
            log.seek(0)
            return log.read()

        try:
            (post,) = unit["ExecStartPost"]
            begun = time.monotonic()
            try:
                started = in_ns(unit_command(post), 30).returncode
            except subprocess.TimeoutExpired:
                started = "timeout"
            assert started == 0, f"ExecStartPost: {started}\n{output()}"
            print(f"ExecStartPost returned after {time.monotonic() - begun:.1f}s")
            assert "pinned in /sys/fs/bpf/xlb/" in output(), f"xlb pinned nothing:\n{output()}"
            assert in_ns(f"curl -s {env['XLB_ADMIN_URL']}/readyz", 5).stdout.strip() == "ready", output()
            xlb_pid = None
            for line in sh("ip", "netns", "pids", topo.lb).stdout.split():
                if Path(f"/proc/{line}/exe").resolve() == Path(xlb).resolve():
                    xlb_pid = line
            assert xlb_pid, "no xlb process in the namespace"
            for line in unit["ExecReload"]:
                cmd = unit_command(line).replace("/usr/local/bin/xlb", xlb).replace("$MAINPID", xlb_pid)
                got = in_ns(cmd, 10)
                assert got.returncode == 0, f"{cmd}: {got.stderr}"
            time.sleep(1)
            assert proc.poll() is None, f"xlb exited on reload:\n{output()}"
            assert in_ns(f"curl -s {env['XLB_ADMIN_URL']}/readyz", 5).stdout.strip() == "ready", output()
            assert "SIGTERM" in unit["KillSignal"], unit["KillSignal"]
            os.kill(int(xlb_pid), 15)
            stop = float(unit["TimeoutStopSec"][0])
            assert proc.wait(stop) == 0, f"xlb did not exit 0 on SIGTERM:\n{output()}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        made = set()
        lines = trace.read_text().splitlines()
        # From xlb's own start: setpriv's calls before it are not the service's.
        first = next(i for i, line in enumerate(lines) if f'execve("{xlb}"' in line)
        for line in lines[first + 1 :]:
            parts = line.split(None, 1)
            if len(parts) == 2 and "(" in parts[1] and not parts[1].startswith(("+++", "---", "<...")):
                made.add(parts[1].split("(", 1)[0])
        allowed = syscall_set(unit["SystemCallFilter"])
        assert len(made) > 20, f"strace saw too little: {sorted(made)}"
        assert made <= allowed, f"xlb makes system calls the unit's SystemCallFilter refuses: {sorted(made - allowed)}"


CASES = {"lifecycle": lifecycle, "interface_choice": interface_choice, "systemd_unit": systemd_unit}

if __name__ == "__main__":
    names = sys.argv[1:] or ["all"]
    if names == ["all"]:
        names = list(CASES)
    for name in names:
        try:
            CASES[name]()
        except Exception as e:
            print(f"FAILED {name}: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        print(f"ok {name}")
