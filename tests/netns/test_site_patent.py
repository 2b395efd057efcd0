"""The remote site in the patent's topology (issue 5, line 2): site24 runs sshd with the
topology, and a router fetches a signed service from it over SFTP, pinning its host key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.vm.repository import package_service, publish_service
from agent.vm.signing import generate_keypair
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

SERVICE_SRC = '''
from agent.sdk import MobileObject


class Echo(MobileObject):
    def handle(self, request):
        return {"echo": request.get("text", "")}
'''


def test_router_fetches_signed_service_from_site24(tmp_path: Path) -> None:
    src = tmp_path / "src" / "echo"
    src.mkdir(parents=True)
    (src / "echo.py").write_text(SERVICE_SRC)
    (src / "object.json").write_text(json.dumps(
        {"entry": "echo:Echo", "resources": {"cpu": 0.1, "memory_mb": 32, "pids": 8}}))
    priv, pub = generate_keypair(tmp_path / "keys", "provider")
    with MoatNetwork(PatentTopo()) as m:
        site = m.net[m.site]
        assert site.sshd_pid is not None
        signed = package_service(tmp_path / "src", "echo", "1.0", "acme", priv, tmp_path / "out")
        publish_service(signed.path, site.repo_root)
        proc = m.net["r18b"].popen(
            [sys.executable, "-m", "agent.vm.fetch", "--host", "10.16.0.24", "--key", str(m.run.dir / "vm_ed25519"),
             "--host-key", str(site.host_public_key_path), "--service", "echo",
             "--dest", str(m.run.dir / "r18b-echo"), "--trusted", str(pub)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-800:]
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert "manifest.json" in json.dumps(report)
        assert (m.run.dir / "r18b-echo" / "manifest.json").exists()
        pid = site.sshd_pid
    assert not Path(f"/proc/{pid}").exists(), "sshd stops with the topology"
