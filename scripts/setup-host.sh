#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (run as root) for L7FP: Debian packages,
# kernel header links for BCC, and the project virtualenv with its wheels.
# Idempotent: every step checks before it acts, so `make` can call it each time.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
APT_PACKAGES=(python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 iptables iproute2
              wrk nghttp2-client curl procps psmisc docker-compose)

log() { printf '[setup] %s\n' "$*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "[setup] error: Debian packages missing (${missing[*]}); run as root or install them" >&2
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BCC compiles against kernel headers. This kernel ships none, so point its
# module directory at Debian's generic headers (good enough for socket programs).
kdir=/lib/modules/$(uname -r)
if [ "$(id -u)" = 0 ]; then
    hdr_arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
    hdr_common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
    if [ -n "$hdr_arch" ] && [ -n "$hdr_common" ]; then
        mkdir -p "$kdir"
        [ -e "$kdir/build" ] || { ln -sfn "$hdr_arch" "$kdir/build"; log "linked $kdir/build -> $hdr_arch"; }
        [ -e "$kdir/source" ] || { ln -sfn "$hdr_common" "$kdir/source"; log "linked $kdir/source -> $hdr_common"; }
    else
        log "warning: no Debian kernel headers found under /usr/src; kernel features will be off"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
log "installing Python packages into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]'

# Make only Debian's `bcc` package visible to the venv, not all of dist-packages.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
    mkdir -p "$VENV/bcc-only"
    ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/bcc-only/bcc"
    realpath "$VENV/bcc-only" > "$site/l7fp-bcc.pth"
fi
"$VENV/bin/envoy" --version >/dev/null
log "ready: $("$VENV/bin/envoy" --version | grep -o 'version: [^ ]*' | head -n1)"
