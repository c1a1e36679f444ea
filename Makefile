# XLB: `make demo` runs it for real in network namespaces; `make test` runs
# every test. Both need root (XDP, BPF, namespaces) and install what they
# need on Debian 12 through scripts/setup.sh.

CARGO ?= cargo
BPF_SRC := $(wildcard src/bpf/*.c src/bpf/*.h)

.PHONY: all setup build test demo demo-one-armed lint fmt bench clean fuzz

all: build

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --locked
	@echo "built target/release/xlb"

test: setup
	@[ "$$(id -u)" = 0 ] || { echo "make test needs root (XDP, BPF maps, network namespaces)"; exit 1; }
	$(CARGO) test --locked
	@# The benchmark harness's smoke run (under a minute, asserts no speed):
	@# keeps bench/ from rotting. Uses the binaries cargo test just built.
	@scripts/setup-bench.sh
	BENCH_QUICK=1 XLB=target/debug/xlb XLB_BENCH=target/debug/xlb-bench bench/run.sh

# The demo in two shapes: two-armed (client and backends on their own links
# to the XLB node), then one-armed (one bridge, XLB with a single NIC, as on
# a kind/Docker node). demo-one-armed runs only the latter.
demo: build
	scripts/demo.sh two-armed
	scripts/demo.sh one-armed

demo-one-armed: build
	scripts/demo.sh one-armed

# Benchmarks (bench/README.md): XLB against the node's own routing, nftables
# NAT, HAProxy and nginx in network namespaces, plus the data path's own
# cost, 1M connections and the control plane. About 6 minutes; results in
# bench/results/. BENCH_QUICK=1 is a one-minute smoke run of the harness.
bench: build
	@[ "$$(id -u)" = 0 ] || { echo "make bench needs root (XDP, BPF maps, network namespaces)"; exit 1; }
	@scripts/setup-bench.sh
	bench/run.sh

# A long run of the packet fuzzer (make test runs 100k frames); replay a
# failure with XLB_FUZZ_SEED=<seed>.
fuzz: setup
	XLB_FUZZ_ITERS=$${XLB_FUZZ_ITERS:-5000000} $(CARGO) test --locked --test golden fuzz -- --nocapture

lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	clang-format --dry-run --Werror $(BPF_SRC)

fmt:
	$(CARGO) fmt
	clang-format -i $(BPF_SRC)

clean:
	$(CARGO) clean

# Packaging (docs/packaging.md). `make install` as root on a bare-metal node:
# the binary, the systemd unit and a starting /etc/xlb/xlb.yaml (never
# overwritten). DESTDIR stages them for a package instead (no systemctl).
.PHONY: install vm-test
PREFIX ?= /usr/local
DESTDIR ?=
XLB_BIN ?= target/release/xlb

install: build
	install -D -m 0755 $(XLB_BIN) $(DESTDIR)$(PREFIX)/bin/xlb
	install -d -m 0755 $(DESTDIR)/etc/systemd/system
	sed 's#/usr/local/bin/xlb#$(PREFIX)/bin/xlb#g' config/xlb.service >$(DESTDIR)/etc/systemd/system/xlb.service
	chmod 0644 $(DESTDIR)/etc/systemd/system/xlb.service
	install -d -m 0755 $(DESTDIR)/etc/xlb
	[ -e $(DESTDIR)/etc/xlb/xlb.yaml ] || install -m 0640 config/xlb.yaml $(DESTDIR)/etc/xlb/xlb.yaml
	if [ -z "$(DESTDIR)" ]; then \
		[ ! -d /run/systemd/system ] || systemctl daemon-reload; \
		echo "installed; edit /etc/xlb/xlb.yaml, then: systemctl enable --now xlb"; \
	fi

# The end-to-end tests inside a throwaway VM (qemu; KVM when present), for
# developers who would rather not run root XDP tests on their own machine.
vm-test:
	tests/packaging/vm-test.sh
