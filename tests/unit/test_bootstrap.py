"""scripts/bootstrap.sh: syntax, the packages it installs, and how it builds .venv.

Static checks only (no root, nothing installed); tests/netns/test_bootstrap_idempotent.py runs
the script for real.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO / "scripts" / "bootstrap.sh"

REQUIRED_APT = {
    "mininet", "iproute2", "bridge-utils", "iputils-ping", "tshark", "openssh-server",
    "iperf3", "dnsmasq-base", "python3-venv",
}

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not on PATH")


def _text() -> str:
    return BOOTSTRAP.read_text()


def _apt_packages() -> list[str]:
    """The script's apt_packages array, as bash itself reads it (comments, line breaks)."""
    snippet = (
        'eval "$(sed -n \'/^apt_packages=(/,/)/p\' "$1")"; '
        'printf "%s\\n" "${apt_packages[@]}"'
    )
    proc = subprocess.run(
        ["bash", "-c", snippet, "bash", str(BOOTSTRAP)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@needs_bash
def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", str(BOOTSTRAP)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_bash
def test_apt_package_list():
    packages = _apt_packages()
    assert packages, "apt_packages=( ... ) not found in scripts/bootstrap.sh"
    missing = REQUIRED_APT - set(packages)
    assert not missing, f"bootstrap.sh does not install {sorted(missing)}"


def test_preseeds_wireshark_setuid_question():
    # Without this answer, installing tshark asks a debconf question and a non-interactive
    # run (CI, vagrant provision) would hang or fail.
    text = _text()
    assert "wireshark-common/install-setuid" in text
    assert "debconf-set-selections" in text
    assert "DEBIAN_FRONTEND=noninteractive" in text


def test_venv_from_system_python_with_site_packages():
    # The Debian-packaged `mininet` module lives in the system site-packages.
    text = _text()
    assert "--system-site-packages" in text
    assert "/usr/bin/python3" in text


def test_refuses_to_run_as_non_root_before_doing_anything():
    text = _text()
    root_check = text.find('"$(id -u)" -ne 0')
    assert root_check != -1
    assert root_check < text.find("apt-get")
    assert root_check < text.find("-m venv")
