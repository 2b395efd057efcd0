"""``moat repo``: the service provider's tools for the remote site's logic repository.

    moat repo keygen DIR [--name provider]
    moat repo package SRC --service NAME --version V --provider P --key PRIVKEY --out DIR
                          [--policy policy.json]
    moat repo publish DIR REPO_ROOT [--trusted PUBKEY ...]
    moat repo verify DIR --trusted PUBKEY ... [--json]
    moat repo show DIR [--json]

``keygen`` writes an Ed25519 key pair (OpenSSH format; the ``.pub`` is what routers trust).
``package`` builds one reproducible tar.gz per object directory of SRC (each holds an
``object.json``: ``{"entry": "module:Class", "resources": {"cpu": 0.2, "memory_mb": 64,
"pids": 16}}``), writes the manifest and lifecycle policy and signs them. ``publish``
copies a signed service into a repository directory (the one the remote site serves) and
switches ``REPO_ROOT/<service>`` to it atomically. ``verify`` does what a router does before
it runs anything and names the refusal (UnknownSigner, BadSignature, TamperedArchive,
PathTraversal, ManifestError). None of these needs root or a network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.vm.errors import RepositoryError
from agent.vm.repository import inspect_service, package_service, publish_service, verify_service
from agent.vm.signing import generate_keypair, key_id, load_public_key

__all__ = ["main", "build_parser"]


def cmd_keygen(args: argparse.Namespace) -> int:
    priv, pub = generate_keypair(args.dir, args.name)
    print(f"private key {priv} (keep it secret)")
    print(f"public key  {pub} ({key_id(load_public_key(pub))}): give it to the routers")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    svc = package_service(args.src, args.service, args.version, args.provider, args.key,
                          args.out, policy=args.policy)
    print(f"packaged {svc.name} {svc.version} into {svc.path}, signed by {svc.key_id}")
    for obj in svc.manifest.objects:
        print(f"  {obj.name} {obj.version}  {obj.archive}  sha256 {obj.sha256[:16]}…  "
              f"entry {obj.entry}  cpu {obj.resources.cpu} mem {obj.resources.memory_mb} MiB "
              f"pids {obj.resources.pids}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    link = publish_service(args.dir, args.repo_root, trusted_public_keys=args.trusted)
    print(f"published {link.name} -> {link.resolve()}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        svc = verify_service(args.dir, args.trusted)
    except RepositoryError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        else:
            print(f"refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": True, **svc.to_json()}))
    else:
        p = svc.policy
        print(f"ok: {svc.name} {svc.version} by {svc.manifest.provider}, signed by {svc.key_id}")
        print(f"  objects: {', '.join(f'{o.name} {o.version}' for o in svc.manifest.objects)}")
        total = svc.manifest.total_resources()
        print(f"  needs: cpu {total.cpu} mem {total.memory_mb} MiB pids {total.pids}")
        print(f"  policy: usage {p.usage} (transactions {p.max_transactions}, duration "
              f"{p.max_duration_s} s), update check every {p.update_check_interval_s} s, "
              f"shareable {p.shareable}, extensible {p.extensible}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    manifest, policy, signer = inspect_service(args.dir)
    doc = {"manifest": manifest.to_json(), "policy": policy.to_json(), "claimed_signer": signer}
    print(json.dumps(doc, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moat repo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("keygen", help="create an Ed25519 provider key pair")
    p.add_argument("dir", type=Path)
    p.add_argument("--name", default="provider", help="file name stem (default provider)")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("package", help="build and sign a service")
    p.add_argument("src", type=Path)
    p.add_argument("--service", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--provider", required=True)
    p.add_argument("--key", required=True, type=Path, help="the provider's private key")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--policy", type=Path, help="lifecycle policy JSON (default: unlimited use)")
    p.set_defaults(func=cmd_package)
    p = sub.add_parser("publish", help="copy a signed service into a repository, atomically")
    p.add_argument("dir", type=Path)
    p.add_argument("repo_root", type=Path)
    p.add_argument("--trusted", nargs="+", type=Path, help="verify against these keys first")
    p.set_defaults(func=cmd_publish)
    p = sub.add_parser("verify", help="verify a service as a router would")
    p.add_argument("dir", type=Path)
    p.add_argument("--trusted", nargs="+", required=True, type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("show", help="print a service's manifest and policy (unverified)")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RepositoryError as exc:
        print(f"moat repo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"moat repo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
