# The two images of a deployment, built from one file (the second build reuses the first's
# layers, so both cost the disk of one):
#   coordinator  SuperLink, the ServerApp's SuperExec, the Fleet-only proxy, the app registry
#   hospital     SuperNode and the ClientApp's SuperExec
# Each process runs in its own container (deploy/compose.yaml); the entry point is the image's
# main process and the other services of the same image name theirs with `entrypoint:`.
#
# Build from the repository root (`python -m deploy.containers build` does it with Podman):
#   docker build -f deploy/app.Dockerfile --target coordinator -t fedmedvit-coordinator:0.1.0 .
#   docker build -f deploy/app.Dockerfile --target hospital -t fedmedvit-hospital:0.1.0 .
#
# BASE_IMAGE: any Debian-like image with Python 3.11 and its venv module: the official
# python:3.11-slim-bookworm in a real deployment; localhost/debian-py:bookworm made with
# debootstrap where no registry is reachable (deploy/containers.py base).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS runtime

# The non-root user every container runs as (uid 49999, as in Flower's own images). Its home
# is the read-only /app; HOME points at the tmpfs so libraries that cache (matplotlib) can.
RUN getent passwd app >/dev/null \
    || useradd --uid 49999 --user-group --no-create-home --home-dir /app --shell /usr/sbin/nologin app
ENV HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    FLWR_HOME=/tmp/flwr \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# Every dependency from the lock file, each checked against its hashes (--require-hashes), no
# resolver at build time (--no-deps), wheels only. torch is the CPU build (torch==2.13.0+cpu
# in the lock) from TORCH_INDEX_URL; where a folder holds that wheel, pass
# --build-arg TORCH_INDEX_URL= --build-arg PIP_FIND_LINKS=/opt/wheels and mount the folder
# (-v /opt/wheels:/opt/wheels:ro). Hospitals with GPUs lock and install the CUDA build instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
COPY deploy/requirements.lock /opt/requirements.lock
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
        -r /opt/requirements.lock \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/python -m pip uninstall --yes pip \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# The app's code reaches the SuperExecs inside the signed app bundle (FAB); the copy here
# proves that the locked dependencies import it. The proxy and the registry run from here.
WORKDIR /app
COPY core ./core
COPY client ./client
COPY server ./server
COPY deploy/__init__.py deploy/fleet_proxy.py deploy/release.py ./deploy/
RUN python -c "import client.app, server.app, deploy.fleet_proxy, deploy.release" \
    && find /app -name __pycache__ -prune -exec rm -rf {} +
# Nothing in the image belongs to `app`: code and packages are read-only to the processes.
USER app

FROM runtime AS coordinator
LABEL org.opencontainers.image.title="fedmedvit-coordinator"
EXPOSE 8000
ENTRYPOINT ["flower-superlink"]

FROM runtime AS hospital
LABEL org.opencontainers.image.title="fedmedvit-hospital"
ENTRYPOINT ["flower-supernode"]
