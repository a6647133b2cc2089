#!/usr/bin/env bash
# System packages the agent sandboxes need: bubblewrap (the default sandbox), libseccomp2 (the
# seccomp filter of bwrap sandboxes, loaded by the pyseccomp dependency), docker.io (the docker
# sandbox and its tests) and busybox-static (the rootfs of the docker test image); debootstrap
# (the Debian base tests/test_image.py builds the production image on) and docker-compose
# (Debian's 1.29: tests/test_compose.py has it read docker-compose.yml); chromium, the browser
# the console tests drive through Playwright (never `playwright install`); and haproxy, the load
# balancer in front of an instance's API replicas in the multi-host tests.
# Installs only what is missing, with apt-get; does nothing when everything is there.
set -euo pipefail

missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
libraries=$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)
[[ $libraries == *libseccomp.so.2* ]] || missing+=(libseccomp2)
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing ${missing[*]} and no apt-get here; install them with" \
        "your package manager (the bwrap sandbox tests fail and the docker ones skip without" \
        "them)" >&2
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "install-system-deps: missing ${missing[*]}; run as root:" \
            "apt-get update && apt-get install -y ${missing[*]}" >&2
        exit 0
    fi
fi

echo "install-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
