# syntax=docker/dockerfile:1
#
# drover's image: drover as PID 1 (exec-form ENTRYPOINT) serving its built-in
# app by default. To put drover in front of your own app, copy the binary out
# of this image into yours (README, "Container images"):
#   COPY --from=<this image> /usr/local/bin/drover /usr/local/bin/drover
# or leave your image unmodified and copy drover in at run time: this image
# has no shell and no cp, so an initContainer runs `drover install DIR`, which
# copies the binary into DIR (an emptyDir) atomically, mode 0755; the app
# container then runs DIR/drover -- <app> (the Helm chart's wrap.enabled).
#
#   docker build -t drover:dev .
#   docker run --rm --read-only -p 8000:8000 -p 8001:8001 drover:dev
#
# The binary is statically linked (glibc, static-pie), so that copy works in
# any Linux base image: Debian, Ubuntu, Alpine, distroless, scratch.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# Only what `cargo build` reads (see .dockerignore).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
# ring needs a C compiler: the slim image has gcc.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    triple="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$triple" --bin drover \
 && install -D -m 0755 "target/$triple/release/drover" /out/drover \
 && /out/drover --version

# distroless/static: CA certificates, /tmp, tzdata and a `nonroot` user
# (65532); no shell, no package manager. `drover stop` and `drover check`
# serve the exec hooks and debugging a shell would.
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="drover" \
      org.opencontainers.image.description="Container entrypoint and pre-fork supervisor for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/drover /usr/local/bin/drover
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# The app, and the admin server (/healthz, /readyz, /metrics, POST /admin/stop).
EXPOSE 8000 8001
# SIGTERM starts drover's drain: readiness off, --drain-delay, stop accepting,
# in-flight work finishes, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/drover"]
CMD ["--workers", "2"]
