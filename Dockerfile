# syntax=docker/dockerfile:1
# llm-worker image: a wheel built in a throw-away stage, installed alone into a slim runtime.
#
#   docker build -t llm-worker:local .
#   docker run --rm -e LLM_WORKER_API_KEY=... -e LLM_WORKER_REDIS_URL=redis://host:6379/0 llm-worker:local
#   docker run --rm -p 8080:8080 llm-worker:local simulate --host 0.0.0.0 --port 8080

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# builder: wheels for the project and every dependency (compilers live only here, for
# platforms where a dependency ships no binary wheel).
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker

# The project's wheel plus wheels of all its dependencies, so the runtime stage installs
# offline from /wheels and needs no compiler.
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# runtime: no build tools, no source tree, a numeric non-root user.
FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001
ARG APP_GID=10001

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/app \
    LLM_WORKER_METRICS_PORT=9464

RUN groupadd --system --gid "${APP_GID}" app \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /home/app \
       --create-home --shell /usr/sbin/nologin app

COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-index --find-links=/tmp/wheels llm-worker \
    && rm -rf /tmp/wheels \
    && llm-worker --help >/dev/null

WORKDIR /home/app
# Numeric, so that Kubernetes can check runAsNonRoot; the same ids as the user made above.
USER ${APP_UID}:${APP_GID}

# /metrics, /healthz, /readyz
EXPOSE 9464

# python:3.11-slim has no curl; urllib raises (exit 1) on a refused connection or a non-2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLM_WORKER_METRICS_PORT', '9464'), timeout=4)"]

# SIGTERM is a Celery warm shutdown: give `docker stop` a timeout above the job deadline.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-worker"]
CMD ["run"]
