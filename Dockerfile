# syntax=docker/dockerfile:1
#
# telemq broker image.
#   docker build -t telemq .
#   docker run -p 1883:1883 -p 9464:9464 -v telemq-data:/var/lib/telemq telemq
# The configuration is /etc/telemq/telemq.toml (grafana/telemq.toml unless you mount your own);
# arguments after the image name are passed to telemq, e.g. `docker run telemq print-default-config`.

FROM rust:1-bookworm AS build
# The rocksdb crate compiles the bundled RocksDB (C++) and generates its bindings with libclang.
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang libclang-dev g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target caches survive between builds, so only the first one compiles RocksDB
# (10-20 minutes on two cores). The binary is copied out because cache mounts are not part of the
# image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin telemq \
    && cp target/release/telemq /usr/local/bin/telemq

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 telemq \
    && useradd --system --uid 10001 --gid telemq --home-dir /var/lib/telemq --no-create-home \
       --shell /usr/sbin/nologin telemq \
    && mkdir -p /var/lib/telemq /etc/telemq \
    && chown telemq:telemq /var/lib/telemq
COPY --from=build /usr/local/bin/telemq /usr/local/bin/telemq
COPY grafana/telemq.toml /etc/telemq/telemq.toml
USER 10001:10001
WORKDIR /var/lib/telemq
VOLUME ["/var/lib/telemq"]
# 1883 MQTT, 8083 MQTT over WebSocket, 9464 Prometheus metrics; 8883 (MQTT over TLS) and 8084
# (secure WebSocket) once [tls] is configured.
EXPOSE 1883 8883 8083 8084 9464
ENTRYPOINT ["telemq", "--config", "/etc/telemq/telemq.toml"]
