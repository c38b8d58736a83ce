# clawgate: the access-control proxy in front of the OpenClaw gateway, as a container.
# Runs unprivileged (uid 10001), reads its config and token file from a mounted
# /etc/clawgate, and reaches tailscaled through a socket shared in a volume
# (/var/run/tailscale/tailscaled.sock). See config/compose.yml and docs/operations.md.
# Checked without a Docker engine by scripts/check-docker-image.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Wheels only (uvloop, httptools, aiohttp, cryptography ship manylinux wheels): no
# compiler in the image, and a source build would fail loudly instead of silently.
RUN pip install --no-cache-dir --only-binary=:all: --prefix=/install . \
    && rm -rf /install/lib/python3.11/site-packages/pip*

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLAWGATE_CONFIG=/etc/clawgate/clawgate.json
RUN groupadd --system --gid 10001 clawgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin clawgate \
    && mkdir -p /etc/clawgate /var/run/tailscale
COPY --from=build /install /usr/local
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
