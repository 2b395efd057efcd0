"""Root tests: the remote site runs a real sshd in its own namespace and a VM fetches a
signed service from it over SFTP (paramiko), from another namespace, as the site's
unprivileged account: root is refused, and the account reads the repository it is chrooted
in and can change nothing there.

A tiny network of its own (bridge ``s99``, hosts ``site99`` and ``vm99`` on 10.99.0.0/24)
so it can run next to tests that use the patent topology's bridges. Every fetch runs
*inside* ``vm99`` (``python -m agent.vm.fetch`` through ``node.popen``), so the traffic only
crosses namespaces this test made. The network is stopped in a ``finally``; the test then
checks that the sshd it started (by pid) is gone.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import topologies._mininet  # noqa: F401  - first: repairs logging
from mininet.nodelib import LinuxBridge
from mininet.topo import Topo

from agent.vm.fetch import generate_client_key
from agent.core.wait import wait_until
from agent.vm.repository import package_service, publish_service, verify_service
from agent.vm.signing import generate_keypair
from topologies.links import MoatLink
from topologies.net import build_net
from topologies.nodes import MoatHost
from topologies.site import SFTP_ROOT, SITE_USER, RemoteSite

ROOT = Path(__file__).resolve().parents[2]
SITE_IP = "10.99.0.24"
VM_IP = "10.99.0.2"

COUNTER = '''
class Counter:
    def __init__(self):
        self.count = 0
'''


class SiteTopo(Topo):
    """One remote site and one VM host on a bridge of their own."""

    def build(self, run_dir: str = "", **_: object) -> None:  # type: ignore[override]
        self.addSwitch("s99", cls=LinuxBridge, stp=False)
        self.addHost("site99", cls=RemoteSite, ip=f"{SITE_IP}/24", run_dir=run_dir)
        self.addHost("vm99", cls=MoatHost, ip=f"{VM_IP}/24")
        self.addLink("site99", "s99", cls=MoatLink)
        self.addLink("vm99", "s99", cls=MoatLink)


#: Run inside vm99: ``SITE_IP KEY``; prints what the site let it do, as JSON.
SFTP_PROBE = textwrap.dedent("""
    import json, socket, sys, paramiko
    host, key = sys.argv[1], paramiko.Ed25519Key.from_private_key_file(sys.argv[2])
    seen = {}

    def login(user):
        t = paramiko.Transport(socket.create_connection((host, 22), timeout=5))
        t.start_client(timeout=5)
        t.auth_publickey(user, key)
        return t

    def attempt(name, fn):
        try:
            fn()
            seen[name] = "DONE"
        except (OSError, paramiko.SSHException) as exc:
            seen[name] = f"refused: {exc!r}"

    try:
        login("root").close()
        seen["root"] = "ACCEPTED"
    except paramiko.AuthenticationException as exc:
        seen["root"] = f"refused: {exc!r}"
    seen["probe"] = "refused" if seen["root"].startswith("refused") else "ACCEPTED"
    t = login("moat-site")
    seen["site_user"] = "in"
    sftp = paramiko.SFTPClient.from_transport(t)
    seen["listing"] = sorted(sftp.listdir("/"))
    with sftp.open("/counter/manifest.json") as f:
        seen["read_manifest"] = len(f.read())

    def put():
        with sftp.open("/planted", "w") as f:
            f.write("x")

    attempt("put", put)
    attempt("mkdir", lambda: sftp.mkdir("/counter/planted"))
    attempt("remove", lambda: sftp.remove("/counter/manifest.json"))
    attempt("rename", lambda: sftp.rename("/counter", "/gone"))
    attempt("chmod", lambda: sftp.chmod("/counter/manifest.json", 0o666))
    attempt("outside", lambda: sftp.stat("/../../etc/passwd") and sftp.open("/etc/passwd").read())
    attempt("authorized_keys", lambda: sftp.open("/../authorized_keys").read())
    attempt("host_key", lambda: sftp.open("/../../ssh_host_ed25519_key").read())
    t.close()
    print(json.dumps(seen))
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _run_in(node, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
    proc = node.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{argv} timed out in {node.name}: {err.decode()[-2000:]}")
    return proc.returncode, out.decode(), err.decode()


def _fetch(node, *args: str) -> dict:
    code, out, err = _run_in(node, [sys.executable, "-m", "agent.vm.fetch", *args])
    lines = out.strip().splitlines()
    assert lines, f"no report from agent.vm.fetch (exit {code}): {err[-2000:]}"
    report = json.loads(lines[-1])
    assert (code == 0) == report["ok"], (code, report, err[-2000:])
    return report


def test_site_serves_signed_service_over_sftp(tmp_path: Path) -> None:
    # The provider's side: keys, a one-object service, signed and published.
    src = tmp_path / "src" / "counter"
    src.mkdir(parents=True)
    (src / "counter.py").write_text(COUNTER)
    (src / "object.json").write_text(json.dumps({"entry": "counter:Counter"}))
    _, provider_pub = generate_keypair(tmp_path / "provider")
    package_service(src.parent, "counter", "1.0", "acme", tmp_path / "provider" / "provider.key",
                    tmp_path / "svc", policy={"max_transactions": 10})
    # The VM's client key, and a second one the site does not know.
    vm_key = tmp_path / "vm" / "id_ed25519"
    vm_pub = generate_client_key(vm_key, "vm99")
    stranger = tmp_path / "vm" / "id_stranger"
    generate_client_key(stranger, "stranger")
    wrong_host_pub = tmp_path / "wrong_host.pub"
    wrong_host_pub.write_text(generate_client_key(tmp_path / "wrong_host") + "\n")

    run_dir = tmp_path / "site"
    net = build_net(SiteTopo(run_dir=str(run_dir)))
    sshd_pid = None
    try:
        net.start()
        site, vm = net["site99"], net["vm99"]
        assert isinstance(site, RemoteSite)
        sshd_pid = site.sshd_pid
        assert sshd_pid is not None and _alive(sshd_pid)
        assert site.host_public_key_path.read_text().startswith("ssh-ed25519 ")
        config = site.sshd_config_path.read_text()
        assert "PasswordAuthentication no" in config and f"ListenAddress {SITE_IP}" in config
        # sshd listens inside site99's namespace only, not in the root namespace.
        assert f"{SITE_IP}:22" in site.cmd("ss -Hltn")
        assert f"{SITE_IP}:22" not in subprocess.run(["ss", "-Hltn"], capture_output=True,
                                                     text=True).stdout

        site.authorize(vm_pub)
        publish_service(tmp_path / "svc", site.repo_root, trusted_public_keys=[provider_pub])

        common = ["--host", SITE_IP, "--key", str(vm_key), "--service", "counter",
                  "--cache", str(tmp_path / "cache"), "--trusted", str(provider_pub)]
        first = _fetch(vm, *common, "--host-key", str(site.host_public_key_path),
                       "--dest", str(tmp_path / "got1"))
        assert first["ok"], first
        assert first["version"] == "1.0"
        assert "counter-1.0.tar.gz" in first["downloaded"]
        assert first["verified"]["policy"]["max_transactions"] == 10
        verified = verify_service(tmp_path / "got1", [provider_pub])
        assert verified.manifest.object("counter").entry == "counter:Counter"

        # Same version again: only the metadata crosses the network.
        second = _fetch(vm, *common, "--host-key", str(site.host_public_key_path),
                        "--dest", str(tmp_path / "got2"))
        assert second["ok"], second
        assert second["downloaded"] == ["manifest.json", "policy.json", "service.sig"]
        assert second["cached"] == ["counter-1.0.tar.gz"]

        # A different host key: refused before anything is downloaded.
        bad = _fetch(vm, *common, "--host-key", str(wrong_host_pub),
                     "--dest", str(tmp_path / "got3"))
        assert bad["error"] == "HostKeyMismatch", bad
        assert not (tmp_path / "got3").exists()

        # A client key the site does not know.
        unknown = _fetch(vm, "--host", SITE_IP, "--key", str(stranger), "--service", "counter",
                         "--host-key", str(site.host_public_key_path),
                         "--dest", str(tmp_path / "got4"))
        assert unknown["error"] == "AuthenticationFailed", unknown
        assert not (tmp_path / "got4").exists()

        # Passwords are not accepted at all (sshd offers publickey only).
        probe = textwrap.dedent(f"""
            import socket, paramiko
            t = paramiko.Transport(socket.create_connection(("{SITE_IP}", 22), timeout=5))
            t.start_client(timeout=5)
            try:
                t.auth_password("root", "root")
            except paramiko.BadAuthenticationType as exc:
                print("refused", exc.allowed_types)
            except paramiko.AuthenticationException as exc:
                print("refused", exc)
            else:
                print("ACCEPTED")
            t.close()
        """)
        code, out, err = _run_in(vm, [sys.executable, "-c", probe])
        assert code == 0, err
        assert out.startswith("refused"), out
        assert "password" not in out.split("refused", 1)[1], out  # not even offered

        # The same authorized key as root: refused (PermitRootLogin no, AllowUsers); as the
        # site's account: in, chrooted in the repository, which it can read and not change.
        code, out, err = _run_in(vm, [sys.executable, "-c", SFTP_PROBE, SITE_IP, str(vm_key)])
        assert code == 0, err[-2000:]
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen["root"].startswith("refused"), seen
        assert seen["probe"] == "refused", seen  # the probe fails as it should for root
        assert seen["site_user"] == "in" and "counter" in seen["listing"], seen
        assert seen["read_manifest"] > 0, seen
        for attempt in ("put", "mkdir", "remove", "rename", "chmod", "outside", "authorized_keys",
                        "host_key"):
            assert seen[attempt].startswith("refused"), (attempt, seen)
        assert sorted(p.name for p in site.repo_root.iterdir()) == sorted(seen["listing"])
        assert not (site.repo_root / "planted").exists()
        # On the site: everything of sshd's is root's alone, the key file the account's group's.
        for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "sshd_config", "sshd.pid",
                     "sshd.log"):
            st = (run_dir / name).stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), name
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        keys = site.authorized_keys_path.stat()
        assert stat.S_IMODE(keys.st_mode) == 0o640 and keys.st_gid == pwd.getpwnam(SITE_USER).pw_gid
        # The machine's own namespace sees only the empty mount points.
        assert not any((SFTP_ROOT / "repo").iterdir())

        # Nobody listening on that port, or no such host: a clear SiteUnreachable, bounded.
        for host, port in ((SITE_IP, "2222"), ("10.99.0.99", "22")):
            started = time.monotonic()
            gone = _fetch(vm, "--host", host, "--port", port, "--key", str(vm_key),
                          "--service", "counter", "--host-key", str(site.host_public_key_path),
                          "--dest", str(tmp_path / "got5"), "--timeout", "2")
            assert gone["error"] == "SiteUnreachable", gone
            assert time.monotonic() - started < 20
            assert not (tmp_path / "got5").exists()
    finally:
        net.stop()
    assert sshd_pid is not None
    wait_until(lambda: not _alive(sshd_pid), 5, what=f"sshd {sshd_pid} gone after net.stop()")
