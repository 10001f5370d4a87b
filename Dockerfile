# rtgate container image: build with `docker build -t rtgate:0.1.0 .`
# librdkafka is compiled from source by rdkafka-sys and linked statically; the binary needs
# glibc, libgcc_s and libz at run time (all part of debian:bookworm-slim).

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependency layer: build every crate of Cargo.lock against stub sources, so source-only
# changes rebuild just rtgate (librdkafka alone takes minutes).
COPY Cargo.toml Cargo.lock ./
# The workspace's other member (the load tool) is not part of the image: a stub is enough.
COPY bench/Cargo.toml bench/
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && echo 'pub const VERSION: &str = env!("CARGO_PKG_VERSION");' > src/lib.rs \
 && cargo build --release --locked -p rtgate \
 && rm -rf src target/release/rtgate target/release/deps/rtgate-* target/release/deps/librtgate-* \
           target/release/.fingerprint/rtgate-*
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked -p rtgate \
 && install -D -m 0755 target/release/rtgate /out/rtgate \
 && ./target/release/rtgate --version

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rtgate \
 && useradd --system --uid 10001 --gid rtgate --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin rtgate
COPY --from=builder /out/rtgate /usr/local/bin/rtgate
USER 10001:10001
# Takes precedence over server.listen in a config file; override this variable to move it.
ENV RTGATE_SERVER__LISTEN=0.0.0.0:8080
EXPOSE 8080
# Probes the port of RTGATE_SERVER__LISTEN, so a changed listen address keeps a valid check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${RTGATE_SERVER__LISTEN##*:}/healthz" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["rtgate"]
CMD ["serve"]
