#!/usr/bin/env bash
# Check edge-agent.service under a real systemd: install.sh, READY, reload, the watchdog, and remote
# management that persists across restarts, in a container with its own root file system.
#
#   sudo systemd/container-check.sh [--cache DIR] [--keep]
#
# Builds (once; cached in DIR, default /var/tmp/edge-agent-container) a minimal Debian bookworm root
# with mmdebstrap, copies it, boots the copy with `systemd-nspawn --boot` (systemd is PID 1 of the
# container only: this machine's own root and /tmp are never touched) and, inside it:
#   1. runs systemd/install.sh from this checkout (read-only bind mount; pip needs the network)
#   2. plants links an attacker with the service user's rights could leave (orphaned owner, pointing
#      at /etc/shadow and /etc/passwd) and runs install.sh again: their targets must stay root's
#   3. starts a simulated plant, a TLS mosquitto and the agent with the demo config, [mqtt] and
#      [commands]; checks the unit is active (a Type=notify unit is active only after READY=1)
#   4. SIGHUP reload (systemctl reload): applied in place, same main PID
#   5. set_config over MQTT (edge-agent command), then systemctl restart: the pushed config is the one
#      running and the one on disk
#   6. update_model over MQTT (a model file with different bytes), then systemctl restart: the new
#      file is loaded
#   7. a stuck event loop: gdb makes the agent's main thread sleep inside Python; the watchdog
#      (WatchdogSec=30) must kill it and systemd restart it
#   8. systemd-analyze security on the installed unit: exposure <= 2.0
# Prints PASS/FAIL per check; exits 0 only when all pass. --keep leaves the container's root behind.
#
# Needs root, mmdebstrap and systemd-nspawn (apt-get install mmdebstrap systemd-container) and the
# network (Debian mirror, PyPI). Takes about five minutes (the first run also builds the root). It is
# not part of ./dev.sh test: CI machines cannot boot a container.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=/var/tmp/edge-agent-container
KEEP=0
INSIDE=0
MACHINE=edge-agent-check
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,mosquitto,mosquitto-clients,openssl,gdb,procps,util-linux,passwd

while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE=$2; shift ;;
        --keep) KEEP=1 ;;
        --inside) INSIDE=1 ;;
        -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "container-check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "container-check: $*"; }

# =============================================================================== inside the container
if [ "$INSIDE" -eq 1 ]; then
    FAILED=0
    pass() { echo "PASS  $*"; }
    fail() { echo "FAIL  $*"; FAILED=1; }
    EA=/opt/edge-agent/venv/bin/edge-agent
    PY=/opt/edge-agent/venv/bin/python
    prop() { systemctl show -p "$1" --value edge-agent; }
    wait_for() {  # wait_for SECONDS CMD...: until CMD succeeds
        local end=$((SECONDS + $1)); shift
        until "$@" >/dev/null 2>&1; do
            [ $SECONDS -lt $end ] || return 1
            sleep 1
        done
    }
    active() { [ "$(prop ActiveState)" = active ] && [ "$(prop SubState)" = running ]; }
    journal_has() { journalctl -u edge-agent --no-pager -o cat --since "@$1" | grep -qF -- "$2"; }

    # a minimal root has no /etc/hosts: the broker is "localhost", as its certificate says
    grep -qs '^127.0.0.1[[:space:]].*localhost' /etc/hosts || echo "127.0.0.1 localhost" >>/etc/hosts

    say "1. install.sh"
    if /src/systemd/install.sh >/root/install.log 2>&1 && wait_for 60 active; then
        pass "install.sh installed, enabled and started the unit; active: $(prop StatusText)"
    else
        fail "install.sh or start:"
        cat /root/install.log
        journalctl -u edge-agent --no-pager | tail -20
        exit 1
    fi

    say "2. install.sh again, with planted links"
    for planted in /var/lib/edge-agent/planted /etc/edge-agent/planted /etc/edge-agent/models/planted.onnx; do
        ln -sfn /etc/shadow "$planted"
        chown -h 4242:4242 "$planted"  # an owner that no longer exists: what find -nouser looks for
    done
    ln -sfn /etc/passwd /var/lib/edge-agent/planted2 && chown -h 4242:4242 /var/lib/edge-agent/planted2
    before="$(stat -c %U:%G:%a /etc/shadow /etc/passwd | tr '\n' ' ')"
    if /src/systemd/install.sh >/root/install2.log 2>&1; then
        after="$(stat -c %U:%G:%a /etc/shadow /etc/passwd | tr '\n' ' ')"
        if [ "$before" = "$after" ]; then
            pass "links planted by the service user were not followed (/etc/shadow /etc/passwd: $after)"
        else
            fail "install.sh followed a planted link: before $before, after $after"
        fi
    else
        fail "install.sh second run: $(tail -5 /root/install2.log)"
    fi
    rm -f /var/lib/edge-agent/planted /var/lib/edge-agent/planted2 /etc/edge-agent/planted \
        /etc/edge-agent/models/planted.onnx

    say "3. plant, TLS broker, operator, the demo config with [mqtt] and [commands]"
    systemd-run --unit=plant --quiet "$PY" -m edge_agent.demo.plant --opcua-port 48841 --modbus-port 15021
    mkdir -p /root/pki /root/op && cd /root/pki
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=check-ca \
        -keyout ca.key -out ca.pem 2>/dev/null
    issue() {  # issue NAME CN [SAN]
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" -keyout "$1.key" \
            -out "$1.csr" 2>/dev/null
        if [ -n "${3:-}" ]; then printf 'subjectAltName=%s\n' "$3" >"$1.ext"; else : >"$1.ext"; fi
        openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" \
            -out "$1.pem" 2>/dev/null
    }
    issue broker localhost DNS:localhost,IP:127.0.0.1
    issue agent gw-check
    issue operator operator
    install -d -m 0755 /etc/mosquitto/certs
    install -m 0640 -o mosquitto -g mosquitto ca.pem broker.pem broker.key /etc/mosquitto/certs/
    cat >/etc/mosquitto/conf.d/check.conf <<'EOF'
listener 18883 127.0.0.1
cafile /etc/mosquitto/certs/ca.pem
certfile /etc/mosquitto/certs/broker.pem
keyfile /etc/mosquitto/certs/broker.key
require_certificate true
use_identity_as_username true
allow_anonymous false
EOF
    systemctl restart mosquitto
    install -d -m 0750 -g edge-agent /etc/edge-agent/certs /etc/edge-agent/keys
    install -m 0640 -g edge-agent ca.pem agent.pem agent.key /etc/edge-agent/certs/
    "$EA" keys new alice --dir /root/op >/dev/null
    install -m 0640 -g edge-agent /root/op/alice.pub /etc/edge-agent/keys/alice.pub
    "$PY" - >/root/agent.toml <<'EOF'
import re
from edge_agent.demo.runner import demo_text
text = demo_text()
text = re.sub(r'(?m)^(endpoint\s*=\s*)"opc\.tcp://[^"]*"', r'\1"opc.tcp://127.0.0.1:48841/plant"', text)
text = re.sub(r"(?m)^(port\s*=\s*)\d+", r"\g<1>15021", text)
text = re.sub(r'(?m)^(data_dir\s*=\s*)"[^"]*"', r'\1"/var/lib/edge-agent"', text)
text = re.sub(r'(?m)^(id\s*=\s*)"[^"]*"', r'\1"gw-check"', text, count=1)
text = re.sub(r'(?m)^(site\s*=\s*)"[^"]*"', r'\1"site-check"', text, count=1)
# the models the unit lets update_model replace: /etc/edge-agent/models, seeded by install.sh
text = re.sub(r'(?m)^(file\s*=\s*)"[^"]*/([^/"]+\.onnx)"', r'\1"models/\2"', text)
print(text)
print('''
[mqtt]
host = "localhost"
port = 18883
ca_file = "certs/ca.pem"
cert_file = "certs/agent.pem"
key_file = "certs/agent.key"
retry_min = "1s"
retry_max = "2s"

[commands]
enabled = true
config_deadline = "20s"
  [[commands.operators]]
  name = "alice"
  role = "admin"
  public_key = "keys/alice.pub"
''')
EOF
    install -m 0640 -o edge-agent -g edge-agent /root/agent.toml /etc/edge-agent/agent.toml
    if ! "$EA" check-config --config /etc/edge-agent/agent.toml; then fail "the check config does not validate"; fi
    systemctl restart edge-agent
    if wait_for 60 active; then
        pass "active after restart with the demo config (Type=notify: READY=1 arrived): $(prop StatusText)"
    else
        fail "not active with the demo config: $(prop ActiveState)/$(prop SubState)"
    fi
    send() {  # send NAME ARGS...: sign and send a command over MQTT as alice, print the JSON answer
        "$EA" command --broker localhost:18883 --ca /root/pki/ca.pem --cert /root/pki/operator.pem \
            --key /root/pki/operator.key --operator alice --signing-key /root/op/alice.key \
            --gateway site-check/gw-check --timeout 60 "$@"
    }
    wait_for 60 send ping || fail "ping over MQTT: $(send ping 2>&1 | tail -3)"

    say "4. SIGHUP reload"
    pid=$(prop MainPID); mark=$(date +%s)
    sed -i '0,/^interval = "[^"]*"/s//interval = "2s"/' /etc/edge-agent/agent.toml
    systemctl reload edge-agent
    if wait_for 30 journal_has "$mark" "config reloaded from" && [ "$(prop MainPID)" = "$pid" ] && active; then
        applied=$(journalctl -u edge-agent -o cat --since "@$mark" | grep -m1 'config reloaded')
        pass "systemctl reload applied the edit in place (same main PID $pid): $applied"
    else
        fail "reload: $(journalctl -u edge-agent --no-pager -o cat --since "@$mark" | tail -5)"
    fi

    say "5. set_config over MQTT, then systemctl restart"
    sed 's/^interval = "2s"/interval = "3s"/' /etc/edge-agent/agent.toml >/root/pushed.toml
    echo "# pushed by container-check.sh at $(date -u +%FT%TZ)" >>/root/pushed.toml
    answer=$(send set_config config=@/root/pushed.toml 2>&1) || true
    if echo "$answer" | grep -q '"ok": true'; then
        systemctl restart edge-agent
        if wait_for 60 active && cmp -s /root/pushed.toml /etc/edge-agent/agent.toml \
            && send get_config | "$PY" -c 'import json,sys; sys.exit(json.load(sys.stdin)["result"]["config"] != open("/root/pushed.toml").read())'; then
            mode=$(stat -c %a /etc/edge-agent/agent.toml.bak)
            pass "set_config persisted across systemctl restart (file and running config; backup mode $mode)"
        else
            fail "set_config did not persist across a restart"
        fi
    else
        fail "set_config answered: $answer"
    fi

    say "6. update_model over MQTT, then systemctl restart"
    model=/etc/edge-agent/models/chiller_anomaly.onnx
    # the same model with an unknown protobuf field appended (field 1000, varint 1): new bytes, same model
    cp "$model" /root/variant.onnx && printf '\xc0\x3e\x01' >>/root/variant.onnx
    want=$(sha256sum /root/variant.onnx | cut -d' ' -f1)
    answer=$(send update_model name=chiller-health onnx=b64@/root/variant.onnx 2>&1) || true
    if echo "$answer" | grep -q '"ok": true'; then
        mark=$(date +%s)
        systemctl restart edge-agent
        if wait_for 60 active && [ "$(sha256sum "$model" | cut -d' ' -f1)" = "$want" ] \
            && wait_for 30 journal_has "$mark" "loaded from $model"; then
            pass "update_model persisted across systemctl restart ($model, sha256 ${want:0:12}, loaded after the restart)"
        else
            fail "update_model did not persist: $(sha256sum "$model")"
        fi
    else
        fail "update_model answered: $answer"
    fi

    say "7. a stuck event loop and the watchdog"
    restarts=$(prop NRestarts); pid=$(prop MainPID); mark=$(date +%s)
    restarted() { [ "$(prop NRestarts)" -gt "$restarts" ]; }
    # The main thread (the event loop) sleeps inside Python; other threads would go on, the loop does not.
    timeout 120 gdb -p "$pid" -batch -ex 'call (int)PyGILState_Ensure()' \
        -ex 'call (int)PyRun_SimpleString("import time\ntime.sleep(300)")' >/root/gdb.log 2>&1 &
    if wait_for 100 restarted && wait_for 60 active; then
        line=$(journalctl -u edge-agent -o cat --since "@$mark" | grep -m1 -i watchdog)
        pass "watchdog: $line; restarted (main PID $pid -> $(prop MainPID), NRestarts $(prop NRestarts))"
    else
        fail "watchdog did not restart a stuck agent: $(prop ActiveState) NRestarts $(prop NRestarts)"
        tail -3 /root/gdb.log
    fi

    say "8. systemd-analyze security"
    score=$(systemd-analyze security --no-pager edge-agent.service 2>/dev/null | sed -n 's/.*Overall exposure level for edge-agent.service: \([0-9.]*\).*/\1/p')
    if [ -n "$score" ] && awk "BEGIN { exit !($score <= 2.0) }"; then
        pass "systemd-analyze security: exposure $score"
    else
        fail "systemd-analyze security: exposure ${score:-unknown}"
    fi
    exit $FAILED
fi

# ================================================================================ on this machine
[ "$(id -u)" -eq 0 ] || { echo "container-check.sh: run as root (it boots a container)" >&2; exit 1; }
for tool in mmdebstrap systemd-nspawn nsenter; do
    command -v "$tool" >/dev/null || { echo "container-check.sh: $tool is missing (apt-get install mmdebstrap systemd-container)" >&2; exit 1; }
done
mkdir -p "$CACHE/pip"
BASE=$CACHE/base
if [ ! -x "$BASE/usr/lib/systemd/systemd" ]; then
    say "building a minimal Debian root in $BASE (once)"
    rm -rf "$BASE.tmp"
    mmdebstrap --variant=minbase --include="$PACKAGES" bookworm "$BASE.tmp" http://deb.debian.org/debian
    mv "$BASE.tmp" "$BASE"
fi
RUN=$CACHE/run-$$
say "copying the root to $RUN"
cp -a "$BASE" "$RUN"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$RUN/usr/local/share/ca-certificates/"
fi
LOG=$CACHE/nspawn-$$.log
NSPAWN=""
cleanup() {
    if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
        kill "$NSPAWN" 2>/dev/null || true  # nspawn shuts the container down on SIGTERM
        for _ in $(seq 30); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 1; done
        kill -9 "$NSPAWN" 2>/dev/null || true
    fi
    if [ "$KEEP" -eq 0 ]; then rm -rf "$RUN"; else say "kept $RUN"; fi
}
trap cleanup EXIT
say "booting it with systemd-nspawn --boot (log: $LOG)"
# --register=no --keep-unit: this machine need not run systemd itself. The host network is shared
# (pip needs it), so the plant and the broker listen on loopback ports unlikely to be taken here
# (48841, 15021, 18883); the checkout is mounted read-only.
systemd-nspawn --directory="$RUN" --boot --register=no --keep-unit --machine="$MACHINE" --console=passive \
    --bind-ro="$SRC:/src" --bind="$CACHE/pip:/root/.cache/pip" >"$LOG" 2>&1 &
NSPAWN=$!
LEADER=""
for _ in $(seq 60); do
    LEADER=$(pgrep -P "$NSPAWN" | head -1 || true)
    [ -n "$LEADER" ] && break
    sleep 1
done
[ -n "$LEADER" ] || { cat "$LOG"; echo "container-check.sh: the container did not start" >&2; exit 1; }
# PIP_CERT: pip trusts the container's CA store, which holds this machine's local CAs too (below)
in_ct() { nsenter --target "$LEADER" --all -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$@"; }
for _ in $(seq 60); do
    state=$(in_ct systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 1
done
say "container booted ($state); systemd $(in_ct systemctl --version | head -1 | cut -d' ' -f2) is its PID 1"
if compgen -G "$RUN/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    in_ct update-ca-certificates >/dev/null  # this machine's local CAs (a network that intercepts TLS)
fi
in_ct bash /src/systemd/container-check.sh --inside
