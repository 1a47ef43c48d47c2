# syntax=docker/dockerfile:1
# The scaleshop image: one binary, every role (`serve --target ...`, `migrate`,
# `keys`). Multi-stage: the dependencies are compiled in a layer of their own
# (cargo-chef), so a change to scaleshop's code rebuilds only scaleshop's crates.
# The runtime image is Debian slim with the binary, curl for the health check, and
# a non-root user; it runs with a read-only root file system (the data folder is a
# volume). See docs/deploy.md.
#
#   docker build -t scaleshop .
#   docker run --rm --read-only -p 8080:8080 -v scaleshop-data:/var/lib/scaleshop scaleshop

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
# No debug info in the image's binary (57 MB instead of 233 MB with the release
# profile's line tables); symbols stay, so a backtrace still names functions.
ENV CARGO_PROFILE_RELEASE_DEBUG=false
WORKDIR /src

# The dependency list (recipe.json): changes only when a Cargo.toml or
# Cargo.lock does.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The dependencies alone: this layer stays cached while only our code changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json --package scaleshop --bin scaleshop
COPY . .
RUN cargo build --release --locked --package scaleshop --bin scaleshop \
    && install -D -m 0755 target/release/scaleshop /out/scaleshop

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="scaleshop" \
      org.opencontainers.image.description="A scalable commerce backend: users, catalog, inventory, orders, payments, notifications, images." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
# curl is the health check's client. TLS needs no CA bundle from the system: the
# binary carries its roots (webpki-roots). DL3008 (pin apt versions) is ignored on
# purpose: a Debian release keeps only the newest build of a package, so a pinned
# version stops installing at its next security update; the base image's release
# is the pin, and a rebuild picks up the fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 scaleshop \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/scaleshop --no-create-home --shell /usr/sbin/nologin scaleshop \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/scaleshop /var/lib/scaleshop/data /var/lib/scaleshop/images
COPY --from=builder /out/scaleshop /usr/local/bin/scaleshop
# Every interface on 8080; embedded state (SQLite, mail files, images) in the
# volume. Any other key: SCALESHOP_<KEY> (README, Configuration).
# MIMALLOC_PURGE_DELAY=0: the allocator gives freed memory back at once instead
# of after 1 s; the search index frees a few MiB per commit, so under an order
# load this lowers the peak RSS by about 90 MiB (docs/benchmarks.md, "where the
# search index's memory goes").
ENV SCALESHOP_HTTP_ADDR=:8080 \
    SCALESHOP_DATA_DIR=/var/lib/scaleshop/data \
    SCALESHOP_IMAGE_DIR=/var/lib/scaleshop/images \
    MIMALLOC_PURGE_DELAY=0
VOLUME ["/var/lib/scaleshop"]
WORKDIR /var/lib/scaleshop
USER 10001:10001
EXPOSE 8080
# SIGTERM drains in-flight requests for up to shutdown_grace_secs (20 s), then
# the process exits 0: give it that long before a kill (docker stop -t 25).
STOPSIGNAL SIGTERM
# Liveness: /healthz answers while the process runs (readiness, /readyz, is the
# orchestrator's probe: it also checks the database).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "--max-time", "2", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/scaleshop"]
CMD ["serve", "--target", "all"]
