# One image for every service; the command picks it: `splitunet serve site|aggregator|audit`.
#
#   docker build -t splitunet:0.1.0 .                                  # CPU (default)
#   docker build -t splitunet:0.1.0-cuda --build-arg TORCH_VARIANT=cu124 .   # CUDA wheels of torch
#
# The final stage holds only the virtual environment and a non-root user: no compiler, no pip cache, no source.
# Kubernetes runs it with a read-only root filesystem; /tmp (an emptyDir) is the only writable path it needs.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# cpu, or a CUDA tag of the torch wheel index (cu121, cu124, ...)
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from a closed range and the variant's index: resolving it through the project would pull the
# default (CUDA) build. Its own layer, so a change of the project's code does not reinstall it.
RUN python -m venv /opt/venv \
    && pip install "torch>=2.4,<2.14" --index-url "${TORCH_INDEX}/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install . \
    && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="splitunet" \
      org.opencontainers.image.description="Split-U-Net federation: site, aggregator and audit services" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 splitunet \
    && useradd --system --uid 10001 --gid splitunet --no-create-home --home-dir /tmp --shell /usr/sbin/nologin splitunet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /tmp
EXPOSE 8100 8101 8102
ENTRYPOINT ["splitunet", "serve"]
CMD ["site"]
