# fedagent: one image for an instance's API (`fedagent serve`) and its workers (`fedagent worker`).
#   docker build -t fedagent:local .
# The base is Debian 12 (bookworm), whose python3 is 3.11. Another registry or a local import
# of the same release works as well (tests/test_image.py builds one with debootstrap):
#   docker build --build-arg BASE_IMAGE=debian-bookworm:local -t fedagent:local .
# Behind a PyPI mirror, pass its index: --build-arg PIP_INDEX_URL=https://mirror/simple; behind
# a TLS-intercepting proxy, its CA (PEM) for pip to trust during the build (not kept in the
# image): --build-arg BUILD_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)"
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG BUILD_CA_CERTS=
# pip verifies its index with Debian's CA store (and BUILD_CA_CERTS), not its own bundle.
ARG PIP_CERT=/tmp/build-ca.pem

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python3, python3-venv: the interpreter and the virtual environment fedagent is installed in
# (Debian's python3 refuses system-wide pip installs); bubblewrap: the default agent sandbox;
# libseccomp2: compiles the seccomp filter every sandboxed command runs under (the pyseccomp
# dependency loads it); git: agents clone and diff repositories; tini: PID 1 that forwards
# SIGTERM (graceful worker drain) and reaps sandbox leftovers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       python3 python3-venv bubblewrap libseccomp2 git ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# Non-root: the API and workers never need root; bwrap then uses unprivileged user namespaces,
# and a sandboxed command runs as this same uid inside its own user, pid, network, ipc and uts
# namespaces. What it can read is only what bwrap mounts: /usr, /bin, /sbin, /lib*, /etc (this
# image keeps no secret there), FEDAGENT_SANDBOX_RO_PATHS (empty by default; an entry that
# would hold the data dir or the home is refused), its own workspace and its own /tmp. Not
# mounted: /var/lib/fedagent (master key, other runs' workspaces), /home/fedagent,
# /opt/fedagent, /run (Docker secrets); its environment is cleared, and its /proc shows only its
# own processes. Keep secrets out of /etc and /usr when deriving from this image.
RUN groupadd --system --gid 10001 fedagent \
    && useradd --system --uid 10001 --gid fedagent --create-home --home-dir /home/fedagent \
       --shell /usr/sbin/nologin fedagent \
    && install -d -o fedagent -g fedagent -m 0700 /var/lib/fedagent

WORKDIR /opt/fedagent
ENV VIRTUAL_ENV=/opt/fedagent/venv \
    PATH=/opt/fedagent/venv/bin:$PATH
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python3 -m venv "$VIRTUAL_ENV" \
    && { cat /etc/ssl/certs/ca-certificates.crt; printf '%s\n' "$BUILD_CA_CERTS"; } > "$PIP_CERT" \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY federation/ federation/
COPY workflows/ workflows/
COPY activities/ activities/
COPY agents/ agents/
COPY api/ api/
COPY worker/ worker/
COPY cli/ cli/
COPY operations/ operations/
RUN pip install --no-deps . && rm "$PIP_CERT" && fedagent --help > /dev/null

USER fedagent
ENV FEDAGENT_DATA_DIR=/var/lib/fedagent \
    FEDAGENT_API_HOST=0.0.0.0 \
    FEDAGENT_API_PORT=8000 \
    FEDAGENT_LOG_FORMAT=json
VOLUME ["/var/lib/fedagent"]
EXPOSE 8000 9464
ENTRYPOINT ["/usr/bin/tini", "--", "fedagent"]
CMD ["serve"]
