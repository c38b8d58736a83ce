# clawgate: the access-control proxy in front of the OpenClaw gateway, as a container.
# Runs unprivileged (uid 10001), reads its config and token file from a mounted
# /etc/clawgate, and reaches tailscaled through a socket shared in a volume
# (/var/run/tailscale/tailscaled.sock). See config/compose.yml and docs/operations.md.
#
#   docker build -t clawgate:latest .
#
# BASE: any Debian-style image with python3.11 and its venv module (the default, or a
# local one where no registry can be pulled from). clawgate lives in a virtualenv at
# /opt/clawgate, so the layout is the same whether python is /usr/local/bin/python3
# (python:3.11-slim) or /usr/bin/python3 (Debian's python3 + python3-venv).
# PIP_INDEX_URL / PIP_FIND_LINKS / PIP_NO_INDEX: where the build's pip finds wheels (a
# mirror); unset, pip uses PyPI. Only the build stage sees them.
# Built and run for real by tests/deploy/test_docker.py (scripts/test).

ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# Wheels only (uvloop, httptools, aiohttp, cryptography ship manylinux wheels): no
# compiler in the image, and a source build would fail loudly instead of silently. So
# proxy/core stays pure Python here (CLAWGATE_COMPILE=0: setup.py skips mypyc; the build
# backend still installs mypy, a [build-system] requirement, from its wheel).
RUN python3 -m venv /opt/clawgate \
    && CLAWGATE_COMPILE=0 /opt/clawgate/bin/pip install --no-cache-dir --disable-pip-version-check \
       --only-binary=:all: . \
    && /opt/clawgate/bin/pip uninstall --yes --quiet pip setuptools \
    && rm -rf /opt/clawgate/bin/pip* /opt/clawgate/bin/[Aa]ctivate* \
    && /opt/clawgate/bin/python -c "import proxy, uvloop, httptools"

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/clawgate/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CLAWGATE_CONFIG=/etc/clawgate/clawgate.json
RUN groupadd --system --gid 10001 clawgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin clawgate \
    && mkdir -p /etc/clawgate /var/run/tailscale
COPY --from=build /opt/clawgate /opt/clawgate
# Mounted at run time: the config, the token file (mode 0600, owned by uid 10001), and
# the directory holding tailscaled's socket.
VOLUME ["/etc/clawgate", "/var/run/tailscale"]
USER 10001:10001
EXPOSE 18789
# The admin listener (loopback, config admin.port) answers 503 when clawgate is
# degraded (tailscaled down, key expired, gateway unreachable): the container is then
# unhealthy. urlopen raises on 503, so the exit status is 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:18790/health', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["clawgate"]
CMD ["serve", "--config", "/etc/clawgate/clawgate.json"]
