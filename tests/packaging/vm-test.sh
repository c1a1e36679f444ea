#!/usr/bin/env bash
# `make vm-test`: XLB's end-to-end tests inside a throwaway VM, for developers
# who would rather not run root XDP tests on their own machine.
#
# The VM is virtme-ng (PyPI) on qemu (Debian's qemu-system-x86): it boots a
# kernel with a read-only view of this machine's files as its root, so the
# tools the tests use (ip, ethtool, curl, python3) and the test binaries built
# here are there; writes go to the guest's tmpfs. Nothing the tests do (XDP,
# namespaces, sysctls, BPF maps) touches the host.
#
# Kernel: $XLB_VM_KERNEL (a vmlinuz whose modules sit in ../lib/modules/<ver>
# beside its boot/ directory), else the host's /boot/vmlinuz-$(uname -r)
# when it and /lib/modules/$(uname -r) exist, else Debian's linux-image-amd64
# unpacked under target/vm-test/kernel (nothing is installed on the host).
# KVM when /dev/kvm works, plain emulation otherwise (or XLB_VM_KVM=0): much
# slower, still correct.
#
# Tests: $XLB_VM_TESTS, cargo integration test names (default: e2e), or `all`
# for every test binary of the crate except this packaging suite.
# Needs root on the host only to install Debian packages when missing.
set -euo pipefail

cd "$(dirname "$0")/../.."
repo=$PWD
work=$repo/target/vm-test
mkdir -p "$work"

# -- inside the guest ---------------------------------------------------------
if [ "${1:-}" = --in-guest ]; then
	out=$2
	shift 2
	{
		echo "guest: $(uname -r), $(nproc) CPUs"
		mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
		rc=0
		for bin in "$@"; do
			echo "== $(basename "$bin")"
			"$bin" --test-threads=1 || rc=1
		done
		echo "guest: tests exited $rc"
	} >"$out/log" 2>&1
	echo "$rc" >"$out/rc"
	exit 0
fi

# -- on the host --------------------------------------------------------------
VIRTME_NG=virtme-ng==1.42

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v depmod >/dev/null || need+=(kmod)
command -v busybox >/dev/null || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || { echo "vm-test: missing Debian packages ${need[*]} (run as root to install)" >&2; exit 1; }
	echo "vm-test: installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$work/venv/bin/vng" ]; then
	echo "vm-test: installing $VIRTME_NG into $work/venv"
	python3 -m venv "$work/venv"
	"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$VIRTME_NG"
fi
export PATH=$work/venv/bin:$PATH

kernel=${XLB_VM_KERNEL:-}
modules=
if [ -z "$kernel" ] && [ -r "/boot/vmlinuz-$(uname -r)" ] && [ -d "/lib/modules/$(uname -r)" ]; then
	kernel=/boot/vmlinuz-$(uname -r)
fi
if [ -z "$kernel" ]; then
	if ! ls "$work"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
		pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
		[ -n "$pkg" ] || { apt-get update -qq && pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'); }
		echo "vm-test: unpacking Debian's $pkg into $work/kernel"
		rm -rf "$work/kernel" "$work"/linux-image-*.deb
		(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1)
		dpkg -x "$work"/linux-image-*.deb "$work/kernel"
	fi
	kernel=$(ls "$work"/kernel/boot/vmlinuz-* | head -n1)
fi
# The guest's root is the host's; a kernel from elsewhere brings its modules
# (veth, 9p, ...) as a read-only /lib/modules.
kroot=$(dirname "$(dirname "$kernel")")
if [ "$kroot" != / ] && [ -d "$kroot/lib/modules" ]; then
	modules=--rodir=/lib/modules=$kroot/lib/modules
fi

echo "vm-test: building the tests"
scripts/setup.sh
tests=${XLB_VM_TESTS:-e2e}
cargo_args=(--tests)
if [ "$tests" != all ]; then
	cargo_args=()
	for t in $tests; do cargo_args+=(--test "$t"); done
fi
cargo build --locked >/dev/null
mapfile -t bins < <(cargo test --locked --no-run --message-format=json "${cargo_args[@]}" 2>/dev/null |
	python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]
            and m["target"]["name"] != "packaging"):
        print(m["executable"])')
[ ${#bins[@]} -gt 0 ] || { echo "vm-test: no test binaries for: $tests" >&2; exit 1; }

run_vm() { # extra vng flags...
	rm -rf "$work/out"
	mkdir -p "$work/out"
	timeout "${XLB_VM_TIMEOUT:-3600}" vng --run "$kernel" --memory 2G --cpus "$(nproc)" $modules \
		--rwdir="$work/out" --cwd "$repo" "$@" \
		--exec "$repo/tests/packaging/vm-test.sh --in-guest $work/out ${bins[*]}" \
		>"$work/vng.log" 2>&1 || true
	[ -e "$work/out/rc" ]
}

echo "vm-test: booting $(basename "$kernel") to run: ${bins[*]##*/}"
ran=
if [ "${XLB_VM_KVM:-1}" != 0 ] && [ -w /dev/kvm ]; then
	run_vm && ran=kvm || echo "vm-test: the KVM run gave no result (see $work/vng.log); retrying with emulation"
fi
if [ -z "$ran" ]; then
	run_vm --disable-kvm && ran=emulation || {
		echo "vm-test: the VM gave no result; its console:" >&2
		tail -n 40 "$work/vng.log" >&2
		exit 1
	}
fi
cat "$work/out/log"
rc=$(cat "$work/out/rc")
echo "vm-test: tests inside the VM ($ran) exited $rc"
exit "$rc"
