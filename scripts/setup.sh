#!/usr/bin/env bash
# Installs what building and testing XLB needs on Debian 12, when missing.
# Idempotent and quiet when everything is there; make calls it.
set -euo pipefail

# Debian package -> a file it provides (how we tell it is installed).
declare -A need=(
	[clang]=/usr/bin/clang
	[llvm]=/usr/bin/llvm-strip
	[clang-format]=/usr/bin/clang-format
	[libelf-dev]=/usr/include/libelf.h
	[zlib1g-dev]=/usr/include/zlib.h
	[linux-libc-dev]=/usr/include/linux/bpf.h
	[pkg-config]=/usr/bin/pkg-config
	[make]=/usr/bin/make
	[gcc]=/usr/bin/gcc
	[iproute2]=/usr/sbin/ip
	[ethtool]=/usr/sbin/ethtool
	[curl]=/usr/bin/curl
	[python3]=/usr/bin/python3
	[util-linux]=/usr/bin/nsenter
	[procps]=/usr/sbin/sysctl
	[systemd]=/usr/bin/systemd-analyze
	[strace]=/usr/bin/strace
	[nftables]=/usr/sbin/nft
)
missing=()
for pkg in "${!need[@]}"; do
	[ -e "${need[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "setup: missing packages: ${missing[*]} (run as root to install them)" >&2
		exit 1
	fi
	echo "setup: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
	echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2
	exit 1
fi

# bpffs, where pinned maps live; harmless if XLB pins nothing.
if [ "$(id -u)" = 0 ] && ! mountpoint -q /sys/fs/bpf; then
	mount -t bpf bpf /sys/fs/bpf
fi
