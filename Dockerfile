# syntax=docker/dockerfile:1
#
# gatecast container image.
#
#   docker build -t gatecast:local .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:8081:8081 gatecast:local
#
# Two stages: the Rust toolchain image compiles the release binary with the
# committed Cargo.lock (--locked), then only that binary goes into a slim
# Debian runtime that runs as an unprivileged user (uid/gid 10001).

############################ build ############################
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The whole context (see .dockerignore: no target/, no .git). Cache mounts keep
# the crate registry and the target directory between builds, so an edit in
# src/ only recompiles gatecast itself, not its dependencies.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin gatecast \
 && install -D -m 0755 target/release/gatecast /out/gatecast

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

# ca-certificates: rediss:// (TLS to managed Redis); curl: the HEALTHCHECK.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gatecast \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin gatecast

COPY --from=builder /out/gatecast /usr/local/bin/gatecast

# Listen on every interface in a container. The binary's own default for the
# internal API is 127.0.0.1:8081, which other containers could not reach.
# Keep port 8081 off the public network: publish it only to trusted peers.
ENV GATECAST_LISTEN=0.0.0.0:8080 \
    GATECAST_API_LISTEN=0.0.0.0:8081 \
    GATECAST_INNER_LISTEN=0.0.0.0:2900 \
    GATECAST_LOG_FORMAT=json

# 8080 public (/ws, /healthz, /readyz), 8081 internal (/api/*, /metrics),
# 2900 inner (GatewayWorker's gateway protocol). GatewayWorker's Register is
# off unless GATECAST_REGISTER_LISTEN is set (usually 0.0.0.0:1236).
EXPOSE 8080 8081 2900

# Numeric user so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]

# SIGTERM starts the drain (see docs/deploy.md); exec form so the binary is PID 1
# and receives it directly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gatecast"]
