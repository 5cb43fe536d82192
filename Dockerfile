# syntax=docker/dockerfile:1
# Images of the operator and the worker, from one build of the workspace:
#   docker build --target operator -t ghcr.io/warren-dev/warren-operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/warren-dev/warren-worker:0.1.0 .
# Both run as a non-root user (65532) on distroless, with nothing to write to: a read-only root filesystem works.

# Base images. The defaults are the public ones; scripts/build-images, which reaches no registry, assembles
# equivalents locally and passes them here (BUILDER_IMAGE, RUNTIME), so this file stays the one to build with.
ARG RUST_VERSION=1.95
ARG BUILDER_IMAGE=rust:${RUST_VERSION}-bookworm
ARG RUNTIME=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
COPY . .
# Registry and target caches survive between builds (BuildKit, buildah); the binaries are copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p warren-operator -p warren-worker --bins \
 && mkdir -p /out \
 && cp target/release/warren-operator target/release/warren-worker /out/

# glibc and libgcc from Debian 12, like the builder; CA certificates for amqps:// and https:// brokers.
FROM ${RUNTIME} AS operator
COPY --from=builder /out/warren-operator /usr/local/bin/warren-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/warren-operator"]
CMD ["run"]

FROM ${RUNTIME} AS worker
COPY --from=builder /out/warren-worker /usr/local/bin/warren-worker
USER 65532:65532
# /metrics, /healthz, /readyz (--metrics-addr, as the operator's Deployment sets it)
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/warren-worker"]
