# tandem, built in one stage and run from a slim one: the runtime image holds the binary, the
# shipped model checkpoint and nothing of the toolchain.
# Build: docker build -t tandem .        Run the whole stack: docker compose up

FROM rust:1.95-bookworm AS build
# aws-lc-sys (TLS for reqwest/qdrant-client) and zstd-sys compile C code.
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
COPY schemas schemas
# The dummy build left fresher artifacts for the crate itself; make sure it is rebuilt.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tandem

FROM debian:bookworm-slim AS runtime
# curl for the health check; ca-certificates for a TLS Qdrant or Redis.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tandem tandem \
    && mkdir -p /var/lib/tandem /srv/tandem /srv/tandem-models \
    && chown tandem /var/lib/tandem /srv/tandem /srv/tandem-models
COPY --from=build /src/target/release/tandem /usr/local/bin/tandem
COPY models /opt/tandem/models
USER tandem
WORKDIR /var/lib/tandem
ENV TANDEM_DATA_DIR=/var/lib/tandem \
    TANDEM_BIND=0.0.0.0:8080 \
    TANDEM_MODEL_PATH=/opt/tandem/models/demo \
    TANDEM_LOG_FORMAT=json
EXPOSE 8080
# SIGTERM (docker stop) drains requests in flight and flushes the event log; the default
# 10 s stop timeout matches server.shutdown_grace_ms.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["tandem"]
CMD ["serve"]
