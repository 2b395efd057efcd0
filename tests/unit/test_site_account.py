"""The remote site's SFTP account is never root (issue 12): the site refuses to be set up
with it, and a router's fetch refuses to log in with it before any connection is made."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.vm.errors import AuthenticationFailed
from agent.vm.fetch import fetch_service, main
from agent.vm.machine import SITE_USER, SiteAccess
from topologies.errors import DaemonError
from topologies.site import ensure_site_user, useradd_command


def test_the_default_account_is_the_unprivileged_site_user() -> None:
    assert SITE_USER == "moat-site"
    assert SiteAccess("10.16.0.24", "/k.pub", "/k").user == SITE_USER


def test_the_site_refuses_root_as_its_account() -> None:
    with pytest.raises(DaemonError, match="must not be root"):
        ensure_site_user("root")


def test_the_account_is_made_without_home_shell_or_a_locked_password() -> None:
    argv = useradd_command("moat-site")
    assert argv[0] == "useradd" and argv[-1] == "moat-site" and "--system" in argv
    assert argv[argv.index("--shell") + 1] == "/usr/sbin/nologin"
    assert argv[argv.index("--password") + 1] == "*"  # '!' would make sshd refuse key logins


def test_fetch_never_logs_in_as_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("connected although the account is root")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(AuthenticationFailed, match="as root"):
        fetch_service("10.16.0.24", 22, "root", tmp_path / "k", tmp_path / "k.pub", "svc",
                      tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_the_fetch_command_defaults_to_the_site_user(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []

    def fake_fetch(host: str, port: int, username: str, *a: object, **k: object) -> None:
        seen.append(username)
        raise AuthenticationFailed("stop here")

    monkeypatch.setattr("agent.vm.fetch.fetch_service", fake_fetch)
    assert main(["--host", "h", "--key", "k", "--host-key", "p", "--service", "s",
                 "--dest", "d"]) == 2
    assert seen == [SITE_USER]
    assert "AuthenticationFailed" in capsys.readouterr().out
