# The image that runs our Flower apps (the coordinator's ServerApp, each hospital's ClientApp)
# and the coordinator's Fleet-only proxy and app registry (deploy/fleet_proxy.py, release.py).
#
# Base: Flower's SuperExec image, the official base for app executors since flwr 1.20 (the
# older flwr/serverapp and flwr/clientapp images stopped at 1.18). The tag pins the flwr
# version we use (1.41.0) and Python 3.11, which this package requires (the bare tag
# `flwr/superexec:1.41.0` is Python 3.13). SuperLink and SuperNode run the stock
# flwr/superlink:1.41.0 and flwr/supernode:1.41.0 images (see compose.yaml): they run no
# code of ours.
#
# Build from the repository root:
#   docker build -f deploy/app.Dockerfile -t fedmedvit-app:0.1.0 .
ARG FLWR_VERSION=1.41.0
ARG PYTHON_TAG=py3.11-ubuntu24.04
FROM flwr/superexec:${FLWR_VERSION}-${PYTHON_TAG}

# /app belongs to the image's non-root user `app` (uid 49999), who owns the venv too.
USER app
WORKDIR /app

# Every dependency from the lock file, each checked against its hashes (--require-hashes),
# no resolver at build time (--no-deps), wheels only. torch is the CPU build
# (torch==2.13.0+cpu in the lock) from the CPU wheel index; hospitals with GPUs lock and
# install the matching CUDA build instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --chown=app:app deploy/requirements.lock ./deploy/requirements.lock
RUN python -m pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
        --extra-index-url "${TORCH_INDEX_URL}" -r deploy/requirements.lock \
    && python -m pip check

# The app's code reaches the SuperExec inside the signed app bundle (FAB); the copy here only
# proves that the locked dependencies import it. The proxy and the registry run from here.
COPY --chown=app:app core ./src/core
COPY --chown=app:app client ./src/client
COPY --chown=app:app server ./src/server
COPY --chown=app:app deploy/__init__.py deploy/fleet_proxy.py deploy/release.py ./deploy/
RUN PYTHONPATH=/app/src python -c "import client.app, server.app" \
    && python -c "import deploy.fleet_proxy, deploy.release"

ENTRYPOINT ["flower-superexec"]
