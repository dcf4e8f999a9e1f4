#!/usr/bin/env bash
# Set up a development environment and run the demo or the tests.
#
#   ./dev.sh demo [--duration SECONDS]   set up, then run the simulated plant with the agent
#   ./dev.sh test [PYTEST ARGS]          set up (incl. mosquitto), then lint, type-check and run every test
#   ./dev.sh setup                       only set up .venv
#
# Works on a fresh Debian/Ubuntu machine with Python 3.11+; installs the few system
# packages it needs (python3-venv; for the tests mosquitto, chromium, nodejs/npm, protobuf-compiler)
# with apt when they are missing.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
    echo "dev.sh: installing $* with apt" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

find_python() {
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "dev.sh: Python 3.11 or newer is required (found: $(python3 --version 2>&1 || echo none))" >&2
    exit 1
}

setup() {
    local py
    py=$(find_python)
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            local ver
            ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            apt_install "python${ver}-venv" || apt_install python3-venv
            "$py" -m venv "$VENV"
        fi
    fi
    # Reinstall only when the project metadata changed since the last install.
    if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # [models] (onnx, scikit-learn) so the tests can rebuild the shipped models
        "$VENV/bin/python" -m pip install -q -e ".[dev,models]"
        touch "$VENV/.installed"
    fi
}

need_test_tools() {
    # the tests run a real mosquitto, an outside subscriber (mosquitto_sub) and an outside signer (openssl)
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    # the web page is tested in headless Chromium; Sparkplug payloads are checked with Eclipse Tahu's own
    # JavaScript codec (node + npm), and the vendored protobuf code against the vendored .proto (protoc)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)

    # Modbus RTU tests run over a real pseudo-terminal pair joined by socat (tests/serial_line.py)
    command -v socat >/dev/null 2>&1 || missing+=(socat)
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    local js=tests/sparkplug_js
    if [ ! -d "$js/node_modules/sparkplug-payload" ] || [ "$js/package-lock.json" -nt "$js/node_modules" ]; then
        npm ci --prefix "$js" --no-audit --no-fund --loglevel=error
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        exec "$VENV/bin/edge-agent" demo "$@"
        ;;
    test)
        setup
        need_test_tools
        "$VENV/bin/ruff" check .
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo [--duration SECONDS] | test [PYTEST ARGS] | setup" >&2
        exit 2
        ;;
esac
