"""An ordinary wheel, installed outside the checkout, runs the demo: nothing is read from the source tree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from the test venv through a .pth
    file (so no network and no minute of pip), the package itself only from the wheel."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(work), str(ROOT)],
                   check=True, capture_output=True, timeout=300, cwd=work)
    wheel = next(work.glob("edge_agent-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_the_wheel_holds_the_demo_config_and_the_models(installed: Path) -> None:
    probe = ("import edge_agent, edge_agent.demo.runner as r; print(edge_agent.__file__); "
             "print(r.shipped_model('chiller_anomaly.onnx')); print(len(r.demo_text()))")
    out = subprocess.run([str(installed / "bin" / "python"), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=installed.parent, env=_env(), timeout=60).stdout.split("\n")
    package, model = Path(out[0]), Path(out[1])
    assert installed in package.parents, f"edge_agent imported from {package}, not the installed wheel"
    assert installed in model.parents and model.read_bytes() == (ROOT / "models" / "chiller_anomaly.onnx").read_bytes()
    assert int(out[2]) == len((ROOT / "edge_agent" / "demo" / "demo.toml").read_text())


def test_the_wheel_serves_the_web_page_assets_and_carries_the_sparkplug_schema(installed: Path) -> None:
    probe = ("import asyncio; from importlib import resources; from edge_agent.service import web; "
             "print(sorted(web._load_static())); "
             "print(resources.files('edge_agent.cloud').joinpath('sparkplug_b.proto').read_text()[:40]); "
             "from edge_agent.cloud import sparkplug; print(len(sparkplug.nbirth(3)) > 10)")
    out = subprocess.run([str(installed / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         cwd=installed.parent, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "['web.css', 'web.js']" and "Copyright" in lines[1] and lines[2] == "True", out.stdout


def test_edge_agent_demo_runs_from_any_directory(installed: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    data = tmp_path / "demo-data"
    proc = subprocess.run([str(installed / "bin" / "edge-agent"), "demo", "--duration", "12", "--data-dir", str(data)],
                          capture_output=True, text=True, cwd=elsewhere, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    good = re.search(r"summary: ran \d+ s; (\d+)/(\d+) device points good", proc.stdout)
    assert good and good.group(1) == good.group(2) and int(good.group(2)) > 0, proc.stdout
    assert re.search(r"^web page: http://127\.0\.0\.1:\d+/ ", proc.stdout, re.M), proc.stdout  # the page's address
    assert (data / "twin.db").stat().st_size > 0 and (data / "agent.toml").exists()
    show = subprocess.run([str(installed / "bin" / "edge-agent"), "twin", "show", "--config", str(data / "agent.toml"),
                           "--json"], capture_output=True, text=True, cwd=elsewhere, env=_env(), timeout=60)
    assert show.returncode == 0, show.stderr
    assert '"chiller1.supply_temp"' in show.stdout
