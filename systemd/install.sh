#!/usr/bin/env bash
# Install edge-agent on a gateway as a hardened systemd service, in one command.
#
#   sudo systemd/install.sh                     install or upgrade, enable and start
#   sudo systemd/install.sh --uninstall         remove unit, venv, models and user; keep config and data
#   sudo systemd/install.sh --uninstall --purge ... and delete /etc/edge-agent and /var/lib/edge-agent too
#
# Options:
#   --root DIR     install under DIR instead of / (also: DESTDIR=DIR). No user is created, nothing is
#                  chowned and systemctl is not run: for tests and for inspecting what would land where.
#                  A venv is not relocatable, so build images by running this script inside the chroot.
#   --python PY    interpreter for the venv (default: the newest python3.13..3.11 on PATH)
#   --no-deps      pip install the package without its dependencies (tests; offline upgrades of the
#                  agent alone when the dependencies are already in the venv)
#
# Idempotent: a second run changes nothing and says so. It never overwrites a config or data:
# /etc/edge-agent/agent.toml is copied from config/agent.example.toml only when absent, and the
# models in /etc/edge-agent/models (the copies remote update_model may replace) likewise.
#
# The service user may write in /etc/edge-agent (remote set_config and update_model) and in
# /var/lib/edge-agent. Nothing this script runs as root follows a link there: chown and chgrp get
# -h, files root writes there are created afresh (install unlinks first), and what goes inside the
# service's own folders (models/) is written as the service user.
set -euo pipefail
# The venv and models must be readable by the service user even if root's umask is 077;
# config and state get their own modes below.
umask 022

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=edge-agent
ROOT=${DESTDIR:-}
PYTHON=""
NO_DEPS=0
ACTION=install
PURGE=0

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }
                ROOT=$2; shift ;;
        --root=*) ROOT=${1#--root=} ;;
        --python) [ $# -ge 2 ] || { echo "install.sh: --python needs an interpreter" >&2; exit 2; }
                  PYTHON=$2; shift ;;
        --no-deps) NO_DEPS=1 ;;
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$PURGE" -eq 1 ] && [ "$ACTION" != uninstall ]; then
    echo "install.sh: --purge only goes with --uninstall" >&2
    exit 2
fi
ROOT=${ROOT%/}
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" = / ] && ROOT=""
fi

OPT=$ROOT/opt/$NAME
VENV=$OPT/venv
ETC=$ROOT/etc/$NAME
STATE=$ROOT/var/lib/$NAME
UNIT_DIR=$ROOT/etc/systemd/system
UNIT=$UNIT_DIR/$NAME.service
STAMP=$VENV/.edge-agent-source

say() { echo "install.sh: $*"; }
real_root() { [ -z "$ROOT" ]; }
# sd_booted(): systemd is PID 1 and its runtime directory exists.
systemd_running() { real_root && [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }

if real_root && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo $0 ...), or give --root DIR to install into a folder" >&2
    exit 1
fi

find_python() {
    if [ -n "$PYTHON" ]; then
        echo "$PYTHON"
        return
    fi
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "install.sh: Python 3.11 or newer is required (apt-get install python3 python3-venv)" >&2
    exit 1
}

# Copy $1 to $2 with mode $3 unless $2 already has the same content and mode.
put() {
    if [ -f "$2" ] && cmp -s "$1" "$2" && [ "$(stat -c %a "$2")" = "${3#0}" ]; then
        say "unchanged $2"
        return 1
    fi
    install -D -m "$3" "$1" "$2"
    say "installed $2"
}

make_dir() {  # make_dir DIR MODE [OWNER:GROUP]
    if [ -d "$1" ]; then
        say "exists    $1"
    else
        install -d -m "$2" "$1"
        say "created   $1"
    fi
    if [ "$(stat -c %a "$1")" != "${2#0}" ]; then  # an upgrade may change a folder's mode
        chmod "$2" "$1"
        say "changed   $1 to mode $2"
    fi
    if [ $# -ge 3 ] && real_root; then
        # Files left by a previous install whose user was removed (orphaned ids) go to the new user.
        # -h: never through a link the service user left there (it would hand the target over).
        find "$1" \( -nouser -o -nogroup \) -exec chown -h "$3" {} +
        chown -h "${3%%:*}" "$1" 2>/dev/null || true
        chgrp -h "${3##*:}" "$1"
    fi
}

as_service() {  # run a command as the service user (files it writes in its own folders)
    if real_root; then
        setpriv --reuid="$NAME" --regid="$NAME" --init-groups --reset-env -- "$@"
    else
        "$@"
    fi
}

ensure_user() {
    if ! real_root; then
        say "skipped   system user $NAME (--root given: create it on the target)"
    elif id -u "$NAME" >/dev/null 2>&1; then
        say "exists    system user $NAME"
    else
        useradd --system --user-group --home-dir "/var/lib/$NAME" --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent gateway daemon" "$NAME"
        say "created   system user $NAME"
    fi
}

source_hash() {
    (
        cd "$SRC"
        find edge_agent drivers models -type f \( -name '*.py' -o -name py.typed -o -name '*.toml' \
            -o -name '*.onnx' \) | LC_ALL=C sort |
            xargs sha256sum pyproject.toml
        echo "no-deps=$NO_DEPS"
    ) | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    local py
    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "removing broken venv $VENV (its Python is gone)"
        rm -rf "$VENV"
    fi
    if [ -x "$VENV/bin/python" ]; then
        say "exists    $VENV"
    else
        py=$(find_python)
        mkdir -p "$OPT"
        "$py" -m venv "$VENV"
        say "created   $VENV ($("$VENV/bin/python" --version))"
    fi
    local want
    want=$(source_hash)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        say "unchanged edge-agent package in $VENV (same source)"
        return 1
    fi
    local args=(--disable-pip-version-check --no-input --quiet) build
    [ "$NO_DEPS" -eq 1 ] && args+=(--no-deps)
    # Build from a copy: pip builds in-tree and would leave build/ and *.egg-info in the checkout.
    build=$(mktemp -d)
    # models/ too: the shipped models are the demo's package data (edge_agent.demo.models)
    cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/edge_agent" "$SRC/drivers" "$SRC/models" "$build/"
    find "$build" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    # ensure_venv runs as an if condition, where set -e does not apply: check by hand, or a failed pip
    # would leave a venv without the agent and a stamp saying it is installed.
    if ! "$VENV/bin/python" -m pip install "${args[@]}" "$build"; then
        rm -rf "$build"
        echo "install.sh: pip could not install edge-agent into $VENV (see above); nothing else was changed" >&2
        exit 1
    fi
    rm -rf "$build"
    echo "$want" >"$STAMP"
    say "installed edge-agent $("$VENV/bin/python" -c \
        'from importlib.metadata import version; print(version("edge-agent"))') into $VENV"
}

install_config() {
    local target=$ETC/agent.toml tmp
    if [ -e "$target" ] || [ -L "$target" ]; then
        say "kept      $target (never overwritten)"
        # Owned by the service, so that a remote set_config can replace it in the sticky folder;
        # a link is left alone (-h, and only a plain file is handed over).
        if real_root && [ -f "$target" ] && [ ! -L "$target" ] && [ "$(stat -c %U "$target")" != "$NAME" ]; then
            chown -h "$NAME:$NAME" "$target"
            say "changed   $target owner to $NAME (remote set_config replaces it)"
        fi
        return
    fi
    tmp=$(mktemp)
    # The example keeps its data next to the file; a gateway keeps it in the StateDirectory.
    sed 's|^data_dir = "data"\( *\)|data_dir = "/var/lib/edge-agent"|' "$SRC/config/agent.example.toml" >"$tmp"
    if ! grep -q '^data_dir = "/var/lib/edge-agent"' "$tmp"; then
        rm -f "$tmp"
        echo "install.sh: config/agent.example.toml has no 'data_dir = \"data\"' line to adjust" >&2
        exit 1
    fi
    install -m 0640 "$tmp" "$target"  # install unlinks an existing name first: it never writes through a link
    rm -f "$tmp"
    if real_root; then chown -h "$NAME:$NAME" "$target"; fi
    say "installed $target from config/agent.example.toml: edit its devices, then: systemctl reload $NAME"
}

seed_models() {
    # /etc/edge-agent/models: the models the config names (file = "models/NAME.onnx"), which remote
    # update_model replaces in place. Seeded from the shipped models when absent, never overwritten;
    # written as the service user, since the folder is the service's own.
    local model found=0 dir=$ETC/models
    if [ ! -d "$dir" ]; then
        as_service install -d -m 0750 "$dir"
        say "created   $dir"
    fi
    shopt -s nullglob
    for model in "$SRC"/models/*.onnx; do
        found=1
        local target
        target=$dir/$(basename "$model")
        if [ -e "$target" ] || [ -L "$target" ]; then
            say "kept      $target (never overwritten)"
        else
            as_service sh -c 'umask 027 && cat > "$1.new" && mv -f "$1.new" "$1"' sh "$target" <"$model"
            say "installed $target"
        fi
    done
    shopt -u nullglob
    [ "$found" -eq 1 ] || say "skipped   $dir (no .onnx files in $SRC/models)"
}

install_models() {
    local model found=0
    shopt -s nullglob
    for model in "$SRC"/models/*.onnx; do
        found=1
        put "$model" "$OPT/models/$(basename "$model")" 0644 || true
    done
    shopt -u nullglob
    [ "$found" -eq 1 ] || say "skipped   models (no .onnx files in $SRC/models)"
}

do_install() {
    local changed=0
    ensure_user
    make_dir "$OPT" 0755
    if ensure_venv; then changed=1; fi
    make_dir "$ETC" 1770 "root:$NAME"
    install_config
    make_dir "$STATE" 0700 "$NAME:$NAME"
    install_models
    seed_models
    if put "$SRC/README.md" "$OPT/README.md" 0644; then :; fi
    if put "$SRC/systemd/$NAME.service" "$UNIT" 0644; then changed=1; fi
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable --now "$NAME.service"
        # enable --now leaves a running agent alone; restart it onto the new code or unit.
        if [ "$changed" -eq 1 ]; then systemctl try-restart "$NAME.service"; fi
        say "enabled and started $NAME.service: systemctl status $NAME; journalctl -u $NAME -f"
    else
        say "skipped   systemctl (systemd is not PID 1, or --root given): later run" \
            "systemctl daemon-reload && systemctl enable --now $NAME"
    fi
}

remove() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -rf "$1"
        say "removed   $1"
    fi
}

do_uninstall() {
    if systemd_running && [ -f "$UNIT" ]; then
        systemctl disable --now "$NAME.service" || true
    fi
    remove "$UNIT"
    if systemd_running; then systemctl daemon-reload; fi
    remove "$VENV"
    remove "$OPT/models"
    remove "$OPT/README.md"
    rmdir "$OPT" 2>/dev/null && say "removed   $OPT"
    if real_root && id -u "$NAME" >/dev/null 2>&1; then
        userdel "$NAME"
        say "removed   system user $NAME"
    fi
    if [ "$PURGE" -eq 1 ]; then
        remove "$UNIT_DIR/$NAME.service.d"
        remove "$ETC"
        remove "$STATE"
    else
        for kept in "$ETC" "$STATE" "$UNIT_DIR/$NAME.service.d"; do
            if [ -e "$kept" ]; then say "kept      $kept (--purge deletes it)"; fi
        done
    fi
}

if [ "$ACTION" = install ]; then do_install; else do_uninstall; fi
