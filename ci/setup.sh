#!/usr/bin/env bash
# Installs what amppatch needs on a fresh Debian-like machine: build tools from the distribution,
# amppatch itself (editable, with the test extra) from the package index. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in cc:gcc c++:g++ cmake:cmake ninja:ninja-build ccache:ccache git:git gdb:gdb; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
