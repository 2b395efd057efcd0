"""A sandboxed object cannot read any secret of its run (issue 12, item 2), tested as the
objects' users themselves.

A PatentTopo run provisions the counter from site24 (a VM on r22b: the site's SFTP account,
the VM's storage, an object process) while tcpdump captures the home LAN. Then, with
everything up, a probe runs as an object's uid (the first and last of the objects' range,
:mod:`agent.hosting.object_uids`) and as an arbitrary unprivileged uid (60001;
``setpriv --reuid --regid --clear-groups``), is handed every path under the run directory
(it could not list them itself) and tries to read each file, list each directory and
connect to each socket; it reports what it could. Nothing may be readable. The probe is
first shown to detect what it should: a 0644 file in a scratch directory it can enter is
reported, a 0600 one beside it is not.

The run directory is also audited as root: every file and directory is root's and private
(0600 / 0700), but for the remote site's repository (public service logic, read through the
site's chroot) and its ``authorized_keys`` (0640, the site account's group). Of the run's
sandbox directory (what the objects must reach) whatever the probe can read is searched for
every key of the run, and none is found.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from agent.hosting.object_uids import UID_FIRST, UID_LAST
from experiments.counter_service import publish_counter
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

UNPRIVILEGED = [(f"object uid {UID_FIRST}", UID_FIRST), (f"object uid {UID_LAST}", UID_LAST),
                ("uid 60001", 60001)]
#: Paths under the run directory that may be wider than 0600/0700 (relative, as prefixes).
SITE_PUBLIC = ("site24/repo",)
SITE_GROUP = ("site24/authorized_keys",)

PROBE = textwrap.dedent("""
    import json, os, socket, stat, sys
    readable = []
    for path in json.load(sys.stdin):
        try:
            st = os.lstat(path)
        except OSError:
            continue  # cannot even see it: not readable
        try:
            if stat.S_ISDIR(st.st_mode):
                os.listdir(path)
            elif stat.S_ISSOCK(st.st_mode):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(1)
                s.connect(path)
                s.close()
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    f.read(1)
            else:
                continue
            readable.append(path)
        except OSError:
            pass
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                      "readable": readable}))
""")


def _as_user(uid: int, gid: int, paths: list[str]) -> dict:
    """Run the probe as ``uid:gid`` with no supplementary group; what it could read."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
            sys.executable, "-I", "-S", "-c", PROBE]
    done = subprocess.run(argv, input=json.dumps(paths), capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (seen["uid"], seen["gid"], seen["groups"]) == (uid, gid, []), seen
    return seen


def _users() -> list[tuple[str, int, int]]:
    """(label, uid, gid) of each user the probe runs as (objects get uid = gid)."""
    return [(label, uid, uid) for label, uid in UNPRIVILEGED]


def _walk(root: Path) -> list[Path]:
    """Everything under ``root``, ``root`` included, links not followed."""
    found = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        found += [Path(dirpath) / n for n in dirnames + filenames]
    return found


def _secrets(m: MoatNetwork) -> dict[str, bytes]:
    """Every key of the run (raw and hex), and the private key files' contents."""
    ring = m.keyring
    if hasattr(ring, "all_secrets"):
        keys = dict(ring.all_secrets())
    else:
        keys = {"router_key": bytes.fromhex(ring.router_key)}
        for kind in ("mobile_home", "mobile_foreign", "foreign_home"):
            keys.update({f"{kind}/{n}": c.key for n, c in getattr(ring, kind).items()})
        keys.update({f"co/{h}": k for h, k in ring.co_keys.items()})
    out = {}
    for name, key in keys.items():
        out[name] = key
        out[name + " (hex)"] = key.hex().encode()
    for path in (m.run.dir / "vm_ed25519", m.provider_key, m.run.dir / m.site / "ssh_host_ed25519_key"):
        body = b"".join(line for line in Path(path).read_bytes().splitlines()
                        if line and not line.startswith(b"-----"))
        out[str(path)] = body
    return out


def test_the_probe_sees_a_readable_file() -> None:
    """The probe works: as either user it reports a 0644 file in a directory it may enter,
    not a 0600 one beside it, nor a 0644 one in a 0700 directory."""
    scratch = Path(tempfile.mkdtemp(prefix="moat-probe-"))
    try:
        os.chmod(scratch, 0o755)
        (scratch / "wide").write_text("x")
        os.chmod(scratch / "wide", 0o644)
        (scratch / "narrow").write_text("x")
        os.chmod(scratch / "narrow", 0o600)
        (scratch / "closed").mkdir(mode=0o700)
        (scratch / "closed" / "inside").write_text("x")
        os.chmod(scratch / "closed" / "inside", 0o644)
        paths = [str(p) for p in _walk(scratch)]
        for label, uid, gid in _users():
            readable = _as_user(uid, gid, paths)["readable"]
            assert sorted(readable) == sorted([str(scratch), str(scratch / "wide")]), (label, readable)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_no_run_secret_is_readable_by_an_object_user() -> None:
    if shutil.which("setpriv") is None or shutil.which("tcpdump") is None:
        pytest.skip("setpriv (util-linux) and tcpdump are needed")
    users = _users()
    with MoatNetwork(PatentTopo()) as m:
        with m.capture("s16", "home_lan") as pcap:
            publish_counter(m, "counter-svc")
            answer = m.provision("r22b", vm="counter", kind="service", service="counter-svc",
                                 mobile={"counter": "counter"})
            assert answer.get("ok"), answer
            m.wait_for(lambda: m.agent("r22b").call("objects"), timeout=15)
        run_dir, sandbox = m.run.dir, m.run.sandbox_dir
        everything = _walk(run_dir)
        names = {p.relative_to(run_dir).as_posix() for p in everything if p != run_dir}
        # What the probe is handed really holds the secrets and what they were written for.
        for expected in ("run.json", "objects.json", "r22b.json", "r22b.log", "r22b.sock",
                         "vm_ed25519", "provider/provider.key", "site24/ssh_host_ed25519_key",
                         "site24/sshd_config", "site24/sshd.log", "dns23/dnsmasq.conf",
                         "captures/home_lan.pcap"):
            assert expected in names, (expected, sorted(names))

        # As root: everything the run wrote is root's, and private but for the site's share.
        wide = []
        for p in everything:
            st = os.lstat(p)
            rel = p.relative_to(run_dir).as_posix() if p != run_dir else "."
            if stat.S_ISLNK(st.st_mode):  # the sandbox links; the repository's versions
                assert rel in ("objects", "vm") or rel.startswith(SITE_PUBLIC), rel
                continue
            assert st.st_uid == 0, (rel, st.st_uid)
            if rel.startswith(SITE_PUBLIC) or rel in SITE_GROUP:
                continue
            if st.st_mode & 0o077:
                wide.append((rel, oct(stat.S_IMODE(st.st_mode))))
        assert wide == [], wide
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(pcap).st_mode) == 0o600 and os.stat(pcap).st_size > 24

        keys = _secrets(m)
        for label, uid, gid in users:
            readable = _as_user(uid, gid, [str(p) for p in everything])["readable"]
            assert readable == [], (label, readable)
            # The sandbox side: what this user can read there carries no key of the run.
            shared = [str(p) for p in _walk(sandbox)]
            for path in _as_user(uid, gid, shared)["readable"]:
                if Path(path).is_file():
                    body = Path(path).read_bytes()
                    leaked = [name for name, key in keys.items() if key and key in body]
                    assert leaked == [], (label, path, leaked)
