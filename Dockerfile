# One small static image with both binaries: sessionmesh-operator and
# sessionmesh-sidecar (which also carries the demo app).
#
#   docker build -t sessionmesh:0.1.0 .
#
# Build stage: a pinned Rust toolchain, static musl binaries.
FROM rust:1.89.0-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p sessionmesh-sidecar --bin sessionmesh-sidecar \
      -p sessionmesh-operator --bin sessionmesh-operator \
 && strip target/x86_64-unknown-linux-musl/release/sessionmesh-sidecar \
          target/x86_64-unknown-linux-musl/release/sessionmesh-operator

# Runtime: nothing but the binaries. The operator and the sidecars reach the
# API server with the service account's own CA bundle, so no system CA store
# is needed.
FROM scratch
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/sessionmesh-sidecar /usr/local/bin/sessionmesh-sidecar
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/sessionmesh-operator /usr/local/bin/sessionmesh-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sessionmesh-sidecar"]
CMD ["--help"]
