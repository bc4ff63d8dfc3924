# syntax=docker/dockerfile:1
#
# The cpa-usage-exporter image: a release build on Debian 12, run on distroless.
#
#   docker build -t cpa-usage-exporter --build-arg REVISION=$(git rev-parse --short=12 HEAD) .
#   docker run -d -p 9317:9317 -v cpa-usage-exporter:/var/lib/cpa-usage-exporter \
#     -e CPA_URL=http://cpa:8317 -e CPA_MANAGEMENT_KEY_FILE=/run/secrets/cpa-management-key \
#     cpa-usage-exporter
#   docker run --rm -p 9317:9317 cpa-usage-exporter demo      # no CPA needed
#
# Runtime choice: gcr.io/distroless/cc-debian12 (glibc and libgcc, no shell, no package
# manager). The binary is linked against glibc, the target CI builds and tests, and the builder
# is Debian 12 too, so the glibc versions match. A static musl build would allow an even smaller
# base, but musl's allocator is much slower for the allocation-heavy JSON decoding on the
# ingest path, and the saving is a few MB. The image has no curl or wget, so HEALTHCHECK uses
# the binary's own hidden `healthcheck` subcommand: GET /healthz on the listen address, over
# TLS when the web config enables it. With required client certificates it cannot pass the
# handshake: disable the HEALTHCHECK then and rely on Prometheus' `up`.
#
# Pinned tags; bump them deliberately (and RUST_VERSION no lower than the newest
# `rust-version` among the locked dependencies: tests/stack.rs checks this).

ARG RUST_VERSION=1.88
ARG DISTROLESS=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-bookworm AS builder
# The git revision for cpa_exporter_build_info{revision}; .git is not in the build context.
ARG REVISION=unknown
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY crates ./crates
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CPA_EXPORTER_REVISION="${REVISION}" \
      cargo build --release --locked --bin cpa-usage-exporter \
    && install -D -m 0755 target/release/cpa-usage-exporter /out/cpa-usage-exporter \
    && install -d -m 0750 /out/state

FROM ${DISTROLESS}
LABEL org.opencontainers.image.title="cpa-usage-exporter" \
      org.opencontainers.image.description="Prometheus exporter for CLIProxyAPI (CPA) usage" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/cpa-usage-exporter /usr/local/bin/cpa-usage-exporter
# The state directory, owned by the non-root user so a fresh named volume inherits it.
COPY --from=builder --chown=65532:65532 /out/state /var/lib/cpa-usage-exporter
# distroless "nonroot": uid/gid 65532. Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# Relative default paths land in the volume: ./cpa-usage-exporter.db (and, for `demo`,
# ./cpa-usage-exporter-demo.db, kept apart from real counters).
WORKDIR /var/lib/cpa-usage-exporter
VOLUME ["/var/lib/cpa-usage-exporter"]
# Change the port here (CPA_EXPORTER_LISTEN), not with --listen: the HEALTHCHECK reads the
# environment, not the command line.
ENV CPA_EXPORTER_LISTEN=0.0.0.0:9317
EXPOSE 9317
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/cpa-usage-exporter", "healthcheck"]
# SIGTERM (docker stop) finishes and commits the batch in hand, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cpa-usage-exporter"]
