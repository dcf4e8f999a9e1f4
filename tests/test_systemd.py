"""The systemd unit (systemd-analyze security and verify) and install.sh in a throwaway root.

Nothing here touches the machine's /etc: install.sh runs with --root in a temp folder, and
systemd-analyze reads the unit from there with --root (which also makes verify look for the
ExecStart binary under that root, where install.sh put the venv).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-agent.service"
INSTALL = REPO / "systemd" / "install.sh"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd); the unit checks need it")

# Targets the unit and systemd's implicit service dependencies refer to; verify needs them to
# exist under --root. Stubs keep the check about our unit, not about the host's unit set.
STUB_TARGETS = ("sysinit", "basic", "shutdown", "network-online", "time-sync", "multi-user")


def _exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, f"no 'Overall exposure level' line in:\n{output}"
    return float(match.group(1))


def _security(*args: str) -> float:
    assert ANALYZE is not None
    proc = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", *args],
                          capture_output=True, text=True, timeout=60)
    return _exposure(proc.stdout + proc.stderr)


def _checkout(tmp_path: Path, models: bool = False) -> Path:
    """A copy of what install.sh reads from the checkout (so the test never writes into the repo)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "edge_agent", "drivers", "config", "systemd"):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "data"))
        else:
            shutil.copy2(path, src / name)
    (src / "models").mkdir()
    shutil.copy2(REPO / "models" / "__init__.py", src / "models" / "__init__.py")  # the package's face
    if models:
        (src / "models" / "chiller_anomaly.onnx").write_bytes(b"\x08\x08not-a-real-model")
    return src


def _install(src: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --no-deps: the package alone, so the test needs neither the network nor a minute of pip.
    cmd = ["bash", str(src / "systemd" / "install.sh"), "--root", str(root), "--python", sys.executable, *args]
    if "--uninstall" not in args:
        cmd.append("--no-deps")
    env = {k: v for k, v in os.environ.items() if k not in ("DESTDIR", "VIRTUAL_ENV", "PYTHONPATH")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"install.sh {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under root with (mode, size, mtime_ns): equal trees mean no change."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size if not path.is_dir() else 0, st.st_mtime_ns)
    return out


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    units = root / "usr" / "lib" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    for name in STUB_TARGETS:
        (units / f"{name}.target").write_text(f"[Unit]\nDescription=stub {name}\n")
    kill = root / "bin" / "kill"  # ExecReload's binary, looked up under --root like ExecStart
    kill.parent.mkdir(parents=True, exist_ok=True)
    kill.write_text("#!/bin/sh\nexit 0\n")
    kill.chmod(0o755)
    return subprocess.run([ANALYZE, "verify", f"--root={root}", "edge-agent.service"],
                          capture_output=True, text=True, timeout=60)


def _rtu_dropin() -> str:
    """The serial-port drop-in, as systemd/README.md shows it (the docs are what users copy)."""
    text = (REPO / "systemd" / "README.md").read_text()
    match = re.search(r"<!-- rtu-dropin -->\s*```ini\n(.*?)```", text, re.S)
    assert match, "systemd/README.md lost its RTU drop-in block"
    return match.group(1)


# ---------------------------------------------------------------------------- the unit


@needs_analyze
def test_security_exposure_is_ok() -> None:
    score = _security(str(UNIT))
    assert score <= MAX_EXPOSURE, f"systemd-analyze security: {score} > {MAX_EXPOSURE}"


def test_unit_runs_the_agent_as_a_watched_notify_service() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml",
                 "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=30", "Restart=on-failure", "User=edge-agent",
                 "StateDirectory=edge-agent", "ConfigurationDirectory=edge-agent", "UMask=0077",
                 "ReadWritePaths=/etc/edge-agent\n", "ConfigurationDirectoryMode=1770\n",
                 "CapabilityBoundingSet=\n", "MemoryDenyWriteExecute=yes", "PrivateDevices=yes"):
        assert line in text, f"edge-agent.service lacks {line!r}"


@needs_analyze
def test_installed_unit_verifies_and_rtu_dropin_stays_ok(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(_checkout(tmp_path), root)
    proc = _verify(root)
    assert proc.returncode == 0 and proc.stderr == "", f"verify:\n{proc.stdout}{proc.stderr}"

    dropin = root / "etc" / "systemd" / "system" / "edge-agent.service.d" / "serial.conf"
    dropin.parent.mkdir()
    dropin.write_text(_rtu_dropin())
    proc = _verify(root)
    assert proc.returncode == 0 and proc.stderr == "", f"verify with the RTU drop-in:\n{proc.stdout}{proc.stderr}"
    assert _security(f"--root={root}", "edge-agent.service") <= MAX_EXPOSURE


@needs_analyze
def test_verify_catches_a_missing_executable(tmp_path: Path) -> None:
    """Guard for the check above: verify under --root does look for ExecStart there."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc" / "systemd" / "system" / UNIT.name)
    proc = _verify(root)
    assert proc.returncode != 0
    assert "/opt/edge-agent/venv/bin/edge-agent is not executable" in proc.stderr


# ---------------------------------------------------------------------------- install.sh


def test_install_lands_files_and_is_idempotent(tmp_path: Path) -> None:
    src, root = _checkout(tmp_path, models=True), tmp_path / "root"
    first = _install(src, root)
    assert "skipped   system user edge-agent" in first.stdout
    assert "skipped   systemctl" in first.stdout

    unit = root / "etc/systemd/system/edge-agent.service"
    assert unit.read_text() == UNIT.read_text()
    agent = root / "opt/edge-agent/venv/bin/edge-agent"
    assert os.access(agent, os.X_OK)
    assert (root / "opt/edge-agent/models/chiller_anomaly.onnx").read_bytes() == b"\x08\x08not-a-real-model"
    # the copies remote update_model may replace, next to the config it may rewrite (both persist)
    assert (root / "etc/edge-agent/models/chiller_anomaly.onnx").read_bytes() == b"\x08\x08not-a-real-model"
    assert oct((root / "etc/edge-agent").stat().st_mode)[-4:] == "1770"
    assert (root / "var/lib/edge-agent").is_dir() and oct((root / "var/lib/edge-agent").stat().st_mode)[-3:] == "700"
    config = root / "etc/edge-agent/agent.toml"
    assert oct(config.stat().st_mode)[-3:] == "640"
    text = config.read_text()
    assert 'data_dir = "/var/lib/edge-agent"' in text and 'data_dir = "data"' not in text
    # The installed copy is a valid config that keeps its data in the StateDirectory.
    check = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check-config", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert check.returncode == 0, check.stderr
    assert "twin at /var/lib/edge-agent/twin.db" in check.stdout
    # The installed entry point runs (package only: --version needs no dependencies).
    version = subprocess.run([str(agent), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "edge-agent 0.1.0", version.stderr

    before = _tree(root)
    second = _install(src, root)
    assert _tree(root) == before, "a second run changed files"
    assert not re.search(r"^install\.sh: (installed|created|removed)", second.stdout, re.M), second.stdout


def test_install_never_overwrites_config_and_upgrades_the_unit(tmp_path: Path) -> None:
    src, root = _checkout(tmp_path), tmp_path / "root"
    config = root / "etc/edge-agent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# the operator's own config\n")
    data = root / "var/lib/edge-agent/twin.db"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"twin")
    proc = _install(src, root)
    assert config.read_text() == "# the operator's own config\n"
    assert data.read_bytes() == b"twin"
    assert "kept      " + str(config) in proc.stdout

    # A newer unit in the checkout replaces the installed one (it is ours, not the user's).
    (src / "systemd" / "edge-agent.service").write_text(UNIT.read_text() + "# v2\n")
    proc = _install(src, root)
    assert (root / "etc/systemd/system/edge-agent.service").read_text().endswith("# v2\n")
    assert "unchanged edge-agent package" in proc.stdout


def test_uninstall_keeps_config_and_data_unless_purged(tmp_path: Path) -> None:
    src, root = _checkout(tmp_path, models=True), tmp_path / "root"
    _install(src, root)
    dropin = root / "etc/systemd/system/edge-agent.service.d/serial.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\n")
    (root / "var/lib/edge-agent/twin.db").write_bytes(b"twin")

    proc = _install(src, root, "--uninstall")
    assert not (root / "etc/systemd/system/edge-agent.service").exists()
    assert not (root / "opt/edge-agent").exists()
    assert (root / "etc/edge-agent/agent.toml").exists()
    assert (root / "var/lib/edge-agent/twin.db").read_bytes() == b"twin"
    assert dropin.exists()
    assert "--purge deletes it" in proc.stdout
    _install(src, root, "--uninstall")  # again: nothing left to do, still exit 0

    _install(src, root, "--uninstall", "--purge")
    assert not (root / "etc/edge-agent").exists()
    assert not (root / "var/lib/edge-agent").exists()
    assert not dropin.parent.exists()


def test_install_usage_errors(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(tmp_path), "--purge"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--purge only goes with --uninstall" in proc.stderr
    proc = subprocess.run(["bash", str(INSTALL), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument: --frobnicate" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_install_never_follows_a_link_as_root() -> None:
    """Issue 11: ``find -nouser -exec chown`` without -h handed a link's target to the service user.

    Every chown and chgrp the script runs gets -h; what it writes inside the service's own folders it
    writes as the service user (systemd/container-check.sh runs the real thing against planted links).
    """
    text = INSTALL.read_text()
    calls = [line.strip() for line in text.splitlines()
             if re.search(r"\b(chown|chgrp)\b", line) and not line.strip().startswith("#")]
    assert calls, "install.sh chowns nothing?"
    assert all(re.search(r"\b(chown|chgrp) -h\b", line) for line in calls), calls
    assert "as_service" in text and "setpriv --reuid=" in text
