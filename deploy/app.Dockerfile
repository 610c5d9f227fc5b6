# The image that runs our Flower apps: the coordinator's ServerApp and each hospital's ClientApp.
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
RUN mkdir -p /app/src
WORKDIR /app/src

# torch first, pinned to the version in pyproject.toml and taken from the CPU wheel index:
# a bare `pip install torch==2.13.0` on Linux resolves to the CUDA build (several GB).
# Hospitals with GPUs set TORCH_INDEX_URL to the matching CUDA index instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app core ./core
COPY --chown=app:app client ./client
COPY --chown=app:app server ./server

# flwr 1.41.0 is already in the base image; install the package without the [simulation]
# extra (Ray), which only `flwr run` simulations need.
RUN sed -i 's/"flwr\[simulation\]==/"flwr==/' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && python -c "import client.app, server.app"

WORKDIR /app
ENTRYPOINT ["flower-superexec"]
