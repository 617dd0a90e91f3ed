#!/usr/bin/env bash
# Installs what amppatch needs on a fresh Debian-like machine: build tools from the distribution, then
# amppatch itself (editable, with the test extra) into the project's virtual environment — `.venv` in the
# checkout, or $AMPPATCH_VENV — never into the system Python (which Debian 12 and Ubuntu 24.04 refuse
# anyway: PEP 668, "externally-managed-environment"). The first python3 on PATH makes the venv; when it
# cannot (Debian and Ubuntu ship `python3 -m venv`'s ensurepip in python3-venv), that package is installed.
# Idempotent and quick when done: pip runs only when pyproject.toml, the checkout's path or the venv's
# Python changed since the last successful install (a stamp in the venv records them).
# Progress goes to stderr; the venv's path is the last (only) line of stdout, so scripts can do
# `venv=$(bash ci/setup.sh)`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 3>&1 1>&2
# One set-up at a time per checkout (the test and the main job may start together): lock this script's file.
exec 9<ci/setup.sh
command -v flock >/dev/null 2>&1 && flock 9

venv="${AMPPATCH_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
stamp="$venv/.amppatch-setup"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=""
apt_install() {
    echo "setup: installing $* (apt-get)"
    if [ -z "$apt_updated" ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

need=()
for tool in cc:gcc c++:g++ cmake:cmake ninja:ninja-build ccache:ccache git:git gdb:gdb python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
[ "${#need[@]}" -eq 0 ] || apt_install "${need[@]}"

venv_works() { [ -f "$venv/pyvenv.cfg" ] && "$venv/bin/python" -c '' >/dev/null 2>&1; }
can_make_venv() { python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }

if ! venv_works; then
    if ! can_make_venv; then
        apt_install python3-venv
        if ! can_make_venv; then
            # python3 on PATH may be a distribution Python other than the default one (python3.X-venv)
            ver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
            apt_install "python$ver-venv"
        fi
    fi
    if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
        echo "setup: $venv exists and is not a virtual environment; move it away or set AMPPATCH_VENV" >&2
        exit 1
    fi
    echo "setup: creating the virtual environment $venv with $(command -v python3) ($(python3 -V 2>&1))"
    python3 -m venv --clear "$venv"
fi

want="pyproject=$(sha256sum pyproject.toml | cut -d' ' -f1) checkout=$PWD python=$("$venv/bin/python" -c \
    'import sys; print(sys.version.split()[0], sys.base_prefix)')"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$venv/bin/amppatch" ]; then
    echo "setup: installing amppatch and its dependencies into $venv (pip)"
    rm -f "$stamp"
    "$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check -e '.[test]'
    printf '%s\n' "$want" >"$stamp"
fi
echo "$venv" >&3
