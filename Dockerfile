# respworkers in a container: `docker build -t respworkers .`, then for example
#   docker run --rm respworkers rw broker -c /etc/respworkers/broker.toml
# deploy/compose.yaml runs a broker, two worker pools and a client with CURVE on.
# The base is any image with python3 (3.9 or newer) and its venv module.
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/respworkers/bin:$PATH

# A dedicated user; the journal (/var/lib/respworkers) and key (/keys) folders are its
# own, so volumes mounted there start out writable by it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/respworkers \
        --no-create-home --shell /usr/sbin/nologin respworkers \
 && mkdir -p /var/lib/respworkers /keys \
 && chown respworkers:respworkers /var/lib/respworkers /keys \
 && chmod 0700 /var/lib/respworkers /keys

COPY pyproject.toml README.md LICENSE /src/
COPY respworkers /src/respworkers
# In a venv of its own: the same layout as the systemd units use (/opt/respworkers/bin/rw).
RUN python3 -m venv /opt/respworkers \
 && /opt/respworkers/bin/pip install /src \
 && rm -rf /src

USER respworkers
WORKDIR /var/lib/respworkers
# Job code: build FROM this image and install your package into /opt/respworkers
# (pip install), or COPY it into the working folder, which is importable.
CMD ["rw", "--help"]
