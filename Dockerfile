# syntax=docker/dockerfile:1
# The XLB image: built the way `make build` builds (scripts/setup.sh, then
# cargo build --release --locked) on Debian bookworm, run on bookworm-slim
# with only what xlb needs at run time. tests/packaging.rs checks that the
# build commands here are the Makefile's and that the runtime packages cover
# every library the binary links.
#
#   docker build -t emaczura/xlb:latest .
#   docker run --rm --network host --cap-add BPF --cap-add NET_ADMIN --cap-add PERFMON \
#     -v /sys/fs/bpf:/sys/fs/bpf -v $PWD/xlb.yaml:/etc/xlb/xlb.yaml:ro emaczura/xlb:latest
# (in Kubernetes, the chart in helm/xlb mounts the ConfigMap at /etc/xlb).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The Debian packages first, so that a source change keeps this layer.
# setup.sh mounts bpffs at /sys/fs/bpf for the tests when nothing is mounted
# there; a build container may not mount, and the build needs no bpffs: a
# tmpfs at that path is a mount point, so setup.sh leaves it alone.
COPY scripts/setup.sh scripts/setup.sh
RUN --mount=type=tmpfs,target=/sys/fs/bpf scripts/setup.sh
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry cargo build --release --locked

FROM debian:${DEBIAN_RELEASE}-slim
# libelf1, zlib1g: linked by xlb (libbpf). iproute2: `ip link show | grep xdp`
# (the guide's troubleshooting) and the chart's prepare-node.sh. curl: the
# chart's readiness probe and `curl 127.0.0.1:9090/api/v1/status`.
# ca-certificates: OTLP export over https.
RUN apt-get update \
	&& apt-get install -y --no-install-recommends libelf1 zlib1g iproute2 curl ca-certificates \
	&& rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/xlb /usr/local/bin/xlb
COPY config/xlb.yaml /usr/share/doc/xlb/xlb.yaml.example
# SIGTERM starts the graceful shutdown (readiness off, RST phase, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/xlb"]
CMD ["run", "--config", "/etc/xlb/xlb.yaml"]
