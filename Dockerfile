# syntax=docker/dockerfile:1
# One image for the gateway and every consumer; the command picks the service:
#   docker run IMAGE                              # onoff-gateway (the default command)
#   docker run IMAGE onoff-consumer warehouse     # or crm, alerts
# In Kubernetes set `args`, never `command`, so tini stays PID 1 (deploy/k8s).
#
# Dependencies come from requirements.lock (exact versions with hashes: the ones the test
# suite ran with; `scripts/deploy-check.sh lock` regenerates it), the build backend from
# requirements-build.lock. Pin the base image by digest when you publish: python:3.11-slim-bookworm@sha256:…
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# tini: a tiny init that forwards SIGTERM to the service and reaps zombies (Debian's static build).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
# Every wheel the project needs exists for CPython 3.11 on linux amd64 and arm64:
# --only-binary keeps compilers out of the build too.
COPY requirements.lock requirements-build.lock /tmp/
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --no-deps --only-binary=:all: \
       -r /tmp/requirements-build.lock \
    && python -m venv --without-pip /opt/venv \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --require-hashes --no-deps \
       --only-binary=:all: -r /tmp/requirements.lock
WORKDIR /src
COPY pyproject.toml README.md ./
COPY onoff_events ./onoff_events
COPY gateway ./gateway
COPY consumers ./consumers
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps /tmp/wheels/*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="onoff-events" \
      org.opencontainers.image.description="Onoff SMS webhooks into Kafka, and the consumers that deliver them" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ONOFF_SCHEMAS_DIR=/app/schemas
RUN groupadd --system --gid 10001 onoff \
    && useradd --system --uid 10001 --gid onoff --no-create-home --home-dir /app \
       --shell /usr/sbin/nologin onoff
COPY --from=build /usr/bin/tini-static /usr/bin/tini
COPY --from=build /opt/venv /opt/venv
# The JSON Schemas the code validates with (ONOFF_SCHEMAS_DIR) and the example alert rules.
COPY schemas /app/schemas
COPY config /app/config
# The embedded defaults (DuckDB warehouse, SQLite dedupe) write to .data/; in Kubernetes the
# root filesystem is read-only and PostgreSQL and Redis are used instead.
RUN install -d -o 10001 -g 10001 /app/.data
WORKDIR /app
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8080 8081
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["onoff-gateway"]
