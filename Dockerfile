# lbproxy in a container: python:3.11-slim, running as the unprivileged user lbproxy with its config in
# /etc/lbproxy. The build stage compiles lbproxy's hot path with mypyc (gcc there only: the final image
# has no compiler); uvloop, httptools, aiohttp and PyYAML come as manylinux wheels.
#   docker run --rm lbproxy lbproxy --version     # lbproxy 0.1.0 (compiled with mypyc)
#
#   docker build -t lbproxy .
#   docker run -d --name lbproxy -p 8080:8080 -p 8443:8443 --stop-timeout 40 \
#       -v /srv/lbproxy:/etc/lbproxy:ro -v lbproxy-state:/var/lib/lbproxy lbproxy
#   docker kill -s HUP lbproxy       # reload the config (or: docker exec lbproxy lbproxy ctl reload)
#
# Mount the config folder, not the file alone: editors replace a file, and a file mount keeps showing
# the old one, so a reload would read the old config.
#
# Give `docker stop` (default 10 s) more time than the config's shutdown_timeout (default 30 s), or the
# requests still in flight are killed with the process: --stop-timeout 40, compose `stop_grace_period`,
# Kubernetes `terminationGracePeriodSeconds`. See docs/operations.md.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# gcc for mypyc's C (and for uvloop or httptools on a platform without their wheels).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment is one folder to copy into the final image, without pip's build leftovers.
# `pip wheel` compiles the hot path (setup.py); a failed compile would leave a pure-Python wheel with
# a warning, so the build checks that the compiled one is what got installed.
RUN python -m venv /opt/lbproxy
COPY pyproject.toml setup.py README.md /src/
COPY lbproxy /src/lbproxy
RUN /opt/lbproxy/bin/pip wheel --no-deps --wheel-dir /wheels /src \
    && /opt/lbproxy/bin/pip install /wheels/lbproxy-*.whl \
    && /opt/lbproxy/bin/lbproxy --version | grep -q "compiled with mypyc"


FROM python:3.11-slim

LABEL org.opencontainers.image.title="lbproxy" \
      org.opencontainers.image.description="A load balancer for a farm of HTTP and TCP servers, on asyncio and uvloop" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/lbproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A system user; /var/lib/lbproxy is where a config's `state_file` belongs (mount a volume there).
RUN groupadd --system --gid 10001 lbproxy \
    && useradd --system --uid 10001 --gid lbproxy --home-dir /var/lib/lbproxy --no-create-home \
        --shell /usr/sbin/nologin lbproxy \
    && install -d -o lbproxy -g lbproxy -m 0750 /var/lib/lbproxy

COPY --from=build /opt/lbproxy /opt/lbproxy
# Owned by root, readable by lbproxy: the process cannot rewrite its own config.
COPY config/lbproxy.yaml config/maintenance.html /etc/lbproxy/

# The example config's listeners (http, tcp) and its admin server (metrics, API, status page). The
# example binds the admin server to 127.0.0.1: the health check below reaches it from inside the
# container; to publish it, bind 0.0.0.0:9090 and set LBPROXY_ADMIN_TOKEN.
EXPOSE 8080 8443 9090

# Numeric, so that Kubernetes' runAsNonRoot can check it; it is the lbproxy user made above.
USER 10001:10001
WORKDIR /var/lib/lbproxy

# Liveness of the process (/healthz), not of the farm: see docs/operations.md. No curl in slim images.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

# SIGTERM: stop accepting, let requests in flight finish within shutdown_timeout, exit 0.
STOPSIGNAL SIGTERM
CMD ["lbproxy", "run", "-c", "/etc/lbproxy/lbproxy.yaml"]
