# syntax=docker/dockerfile:1
#
# gatecast container image.
#
#   docker build -t gatecast:local .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:8081:8081 gatecast:local
#
# Three stages: `deps` compiles every dependency from the manifests and
# Cargo.lock alone (stub sources), so that layer stays cached until a
# manifest or the lockfile changes, also on a CI builder without cache mounts
# (a registry or inline layer cache is enough); `builder` adds the sources and
# compiles gatecast itself with the committed Cargo.lock (--locked); only
# that binary goes into a slim Debian runtime that runs as an unprivileged
# user (uid/gid 10001).

############################ deps ############################
FROM rust:1.95-bookworm AS deps
WORKDIR /src

# The workspace's manifests only, and stub targets where its sources go.
COPY Cargo.toml Cargo.lock ./
COPY emitter/Cargo.toml emitter/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src emitter/src bench/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs emitter/src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked --bin gatecast \
 && rm -rf src emitter/src bench/src \
      target/release/gatecast target/release/deps/gatecast-* target/release/deps/libgatecast* \
      target/release/deps/gatecast_emitter-* target/release/.fingerprint/gatecast-*

############################ build ############################
FROM deps AS builder

# The whole context (see .dockerignore: no target/, no .git). The stub's
# fingerprints are gone, so gatecast and gatecast-emitter build from the real
# sources whatever their timestamps; the dependencies come from `deps`.
COPY . .
RUN cargo build --release --locked --bin gatecast \
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
# GatewayWorker's inner port stays on its loopback default (127.0.0.1:2900):
# a PHP fleet opts in with GATECAST_INNER_LISTEN=0.0.0.0:2900 (and
# GATECAST_REGISTER_LISTEN=0.0.0.0:1236) plus GATECAST_GATEWAY_SECRET_KEY,
# without which gatecast refuses those addresses (docs/gatewayworker.md).
ENV GATECAST_LISTEN=0.0.0.0:8080 \
    GATECAST_API_LISTEN=0.0.0.0:8081 \
    GATECAST_LOG_FORMAT=json

# 8080 public (/ws, /healthz, /readyz), 8081 internal (/api/*, /metrics).
EXPOSE 8080 8081

# Numeric user so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]

# SIGTERM starts the drain (see docs/deploy.md); exec form so the binary is PID 1
# and receives it directly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gatecast"]
