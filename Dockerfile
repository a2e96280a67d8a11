# voxrelay: multi-stage build, release binary on a small non-root runtime image.
# Build: docker build -t voxrelay .
# Run:   docker run -p 8080:8080 --env-file .env voxrelay
# Metrics are on the admin listener, 127.0.0.1:9091 inside the container by default. To scrape
# them from another container, set VOXRELAY_ADMIN_LISTEN=0.0.0.0:9091 and reach port 9091 over
# a private network only (never publish it with -p on a public interface).

FROM rust:1.95-slim-bookworm AS build
# libopus for the call recordings (feature `opus`), linked statically (LIBOPUS_STATIC, read by
# audiopus_sys through pkg-config) so the distroless runtime needs no libopus0.
ENV LIBOPUS_STATIC=1
RUN apt-get update && apt-get install -y --no-install-recommends libopus-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY benches ./benches
COPY fixtures ./fixtures
# The bridge alone: no simulator, mock models or benchmark (`sim`), no reference control plane
# and its SQLite (`control-plane`), with call recordings (`opus`, off until VOXRELAY_RECORD or a
# tenant asks). The workspace's other crates are copied because cargo reads every member's
# manifest; they are not built.
RUN cargo build --release --locked -p voxrelay --bin voxrelay --no-default-features --features opus

# distroless/cc has glibc and libgcc, no shell, and a `nonroot` user (uid 65532). TLS roots are
# compiled into the binary (webpki-roots), so no CA bundle is needed.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/voxrelay /usr/local/bin/voxrelay
USER nonroot:nonroot
# The report spool must be writable by `nonroot`; mount a volume there to keep it across
# container replacements.
# Recordings (when VOXRELAY_RECORD=1 or a tenant asks) go to a directory `nonroot` owns; mount
# a volume there to keep them.
ENV VOXRELAY_LISTEN=0.0.0.0:8080 \
    VOXRELAY_REPORT_SPOOL_DIR=/home/nonroot/spool \
    VOXRELAY_RECORDING_DIR=/home/nonroot/recordings \
    RUST_LOG=info
EXPOSE 8080
# The image has no curl: the binary checks itself, on the admin listener, which the public
# listener's caps do not touch (a flood of connections must not get the container restarted).
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/voxrelay", "healthcheck", "--url", "http://127.0.0.1:9091/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/voxrelay"]
CMD ["serve"]
