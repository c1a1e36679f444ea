# XLB: `make demo` runs it for real in network namespaces; `make test` runs
# every test. Both need root (XDP, BPF, namespaces) and install what they
# need on Debian 12 through scripts/setup.sh.

CARGO ?= cargo
BPF_SRC := $(wildcard src/bpf/*.c src/bpf/*.h)

.PHONY: all setup build test demo lint fmt bench clean

all: build

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --locked
	@echo "built target/release/xlb"

test: setup
	@[ "$$(id -u)" = 0 ] || { echo "make test needs root (XDP, BPF maps, network namespaces)"; exit 1; }
	$(CARGO) test --locked

demo: build
	scripts/demo.sh

lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	clang-format --dry-run --Werror $(BPF_SRC)

fmt:
	$(CARGO) fmt
	clang-format -i $(BPF_SRC)

clean:
	$(CARGO) clean
