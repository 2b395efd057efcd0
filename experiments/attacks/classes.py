"""One function per attack class: send from the attacker host, observe, return a row.

Each function gets the :class:`Context` of the run and returns ``(sent, observed, refused,
detail)``; :func:`run_class` wraps it with the state snapshot before and after, the target
agent's memory before and after, and the ping of every agent after, and makes the row.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from agent.core.errors import AgentError
from packets import ControlMessage, ControlType
from topologies.client import RunClient
from topologies.errors import TopologyError

from . import secrets as run_secrets
from . import state, wire
from .catalog import by_name
from .report import Row

__all__ = ["Context", "run_class", "ATTACKS"]

log = logging.getLogger(__name__)

ATTACKER_TOOL = "nodetools.attacker"
ACCEPTED = (0, 1)


@dataclass
class Context:
    """What every attack needs: the run, the attacker host, the addresses, the scale."""

    client: RunClient
    attacker: str
    attacker_address: str
    victim: str  # the object attacked (runs away from home, on hosting router)
    hosting: str  # router that runs the victim (net 12)
    foa: str  # the FOA the victim registers through
    hoa: str
    third: str  # a router with nothing to do with the victim (net 14)
    captures: Path
    fuzz_count: int = 100_000
    flood_scale: float = 1.0
    co_host: str = "co12"
    captured: dict[str, Any] = field(default_factory=dict)
    _n: int = 0

    def addr(self, node: str) -> str:
        return self.client.address(node)

    @property
    def home(self) -> str:
        return self.client.params["objects"][self.victim]

    def attack(self, command: str, spec: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """Run ``nodetools.attacker COMMAND`` inside the attacker host with ``spec``."""
        self._n += 1
        path = self.client.run.dir / f"attack-{self._n}.json"
        path.write_text(json.dumps(spec))
        try:
            return self.client.tool(self.attacker, ATTACKER_TOOL, command, str(path), timeout=timeout)
        finally:
            path.unlink(missing_ok=True)

    def legit_requests(self, count: int = 10) -> int:
        """How many of ``count`` requests from the legit CO the victim answers."""
        try:
            return int(self.client.requests(self.co_host, self.victim, count=count, rate=20)["answered"])
        except (TopologyError, KeyError, ValueError) as exc:
            log.warning("legit requests failed: %s", exc)
            return 0

    def legit_registration(self) -> int | None:
        """The code of a fresh registration of the victim by its own client."""
        try:
            return self.client.call(self.hosting, "register", timeout=15, name=self.victim).get("code")
        except (AgentError, OSError, AttributeError) as exc:
            log.warning("legit registration failed: %s", exc)
            return None


Result = tuple[str, str, bool, dict[str, Any]]


def run_class(ctx: Context, name: str, fn: Callable[[Context], Result], target: str,
              keys: tuple[str, ...] | None = None, heard: bool = False) -> Row:
    """Run one attack class and make its row (state of ``keys`` compared; None: all)."""
    cls = by_name(name)
    before = state.snapshot(ctx.client, heard=heard)
    rss_before = state.agent_rss(ctx.client, target)
    t0 = time.monotonic()
    try:
        sent, observed, refused, detail = fn(ctx)
    except Exception as exc:  # noqa: BLE001 - one class that cannot run is its row, not the end
        log.exception("attack %s failed to run", name)
        sent, observed, refused, detail = "?", f"the attack did not run: {exc}", False, {}
    detail["seconds"] = round(time.monotonic() - t0, 2)
    time.sleep(0.5)  # let the agents finish what is in flight before looking
    after = state.snapshot(ctx.client, heard=heard)
    changes = state.diff(before, after, keys)
    pings = state.alive(ctx.client)
    detail["changes"] = changes
    if changes:
        detail["victim_client"] = _client_status(ctx)
    if not all(pings.values()):
        detail["not_answering"] = sorted(r for r, ok in pings.items() if not ok)
    alive = all(pings.values()) and detail.pop("legit_ok", True)
    return Row(cls, target, sent, observed, refused, not changes, alive, rss_before,
               state.agent_rss(ctx.client, target), detail)


def _client_status(ctx: Context) -> dict[str, Any]:
    """The victim's registration client as its router reports it: where it is registered,
    the agents it heard, its last attempts (what a state change came through)."""
    try:
        for o in ctx.client.call(ctx.hosting, "objects"):
            if isinstance(o, dict) and o.get("name") == ctx.victim:
                return {"registration": o.get("registration"), "agents": len(o.get("agents") or []),
                        "attempts": (o.get("attempts") or [])[-6:], "bad_replies": o.get("bad_replies")}
    except (AgentError, OSError) as exc:
        return {"error": str(exc)}
    return {}


def _codes(answers: list[dict[str, Any]]) -> list[int]:
    return [a.get("code") for a in answers if "code" in a]


# --- registration ---------------------------------------------------------------------------


def registration_replay(ctx: Context) -> Result:
    captured = ctx.captured.get("rrq") or []
    relayed = ctx.captured.get("relayed") or []
    if not captured:
        return "nothing (no registration captured)", "no request to replay", False, {}
    payloads = [p.hex() for p in captured[-3:]]
    # The object's requests to the FOA, and the FOA's relayed ones (Foreign-Home signed, from
    # the backbone) to the HOA: those pass every authenticator, so only the Identification
    # check (133) stands between them and the binding.
    hoa_payloads = payloads + [p.hex() for p in relayed[-3:]]
    to_foa = ctx.attack("udp", {"dst": ctx.addr(ctx.foa), "port": 434, "payloads": payloads, "listen_s": 1.5})
    to_hoa = ctx.attack("udp", {"dst": ctx.addr(ctx.hoa), "port": 434, "payloads": hoa_payloads,
                                "listen_s": 1.5})
    codes = _codes(to_foa["answers"]) + _codes(to_hoa["answers"])
    relayed_codes = _codes(to_hoa["answers"])[len(payloads):]
    refused = not any(c in ACCEPTED for c in codes) and (not relayed or 133 in relayed_codes)
    return (f"{len(payloads)} captured RRQs to {ctx.foa}; those + {len(relayed[-3:])} captured "
            f"relayed ones to {ctx.hoa} (UDP 434)",
            f"FOA codes {_codes(to_foa['answers']) or 'none'}; HOA codes {_codes(to_hoa['answers']) or 'none'}",
            refused, {"foa_answers": to_foa["answers"], "hoa_answers": to_hoa["answers"]})


def _object_spis(ctx: Context) -> tuple[int, int, str]:
    cfg = ctx.client.object_config(ctx.victim)  # SPIs and NAI cross the wire in clear anyway
    return cfg.mobile_home.spi, cfg.mobile_foreign.spi, cfg.nai


def forged_authenticators(ctx: Context) -> Result:
    mh, mf, nai = _object_spis(ctx)
    hoa, foa, home = ctx.addr(ctx.hoa), ctx.addr(ctx.foa), ctx.home
    coa = ctx.addr(ctx.foa)
    bad_mh = wire.forged_request(home, hoa, coa, nai, mh)
    bad_fh = wire.forged_request(home, hoa, coa, nai, mh, fh_spi=2000)
    bad_mf = wire.forged_request(home, hoa, coa, nai, mh, mf_spi=mf)
    # A deregistration goes to the HOA directly (no FOA, no Foreign-Home): only Mobile-Home
    # protects it, so this one must meet 131.
    bad_dereg = wire.forged_request(home, hoa, home, nai, mh, lifetime=0)
    a = ctx.attack("udp", {"dst": hoa, "port": 434, "payloads": [bad_mh.hex(), bad_fh.hex(), bad_dereg.hex()],
                           "listen_s": 1.5})
    b = ctx.attack("udp", {"dst": foa, "port": 434, "payloads": [bad_mf.hex()], "listen_s": 1.5})
    codes_hoa, codes_foa = _codes(a["answers"]), _codes(b["answers"])
    refused = (not any(c in ACCEPTED for c in codes_hoa + codes_foa)
               and bool(codes_hoa) and set(codes_hoa) <= {131, 132} and set(codes_foa) <= {67})
    return ("3 RRQs to the HOA (wrong MH; wrong FH; a deregistration with a wrong MH), 1 to the "
            "FOA (wrong MF), UDP 434",
            f"HOA codes {codes_hoa or 'none'}, FOA codes {codes_foa or 'none'}", refused,
            {"hoa": a["answers"], "foa": b["answers"]})


def binding_hijack(ctx: Context) -> Result:
    mh, mf, nai = _object_spis(ctx)
    hoa, foa, home = ctx.addr(ctx.hoa), ctx.addr(ctx.foa), ctx.home
    direct = wire.forged_request(home, hoa, ctx.attacker_address, nai, mh)
    via_foa = wire.forged_request(home, hoa, foa, nai, mh, mf_spi=mf)
    a = ctx.attack("udp", {"dst": hoa, "port": 434, "payloads": [direct.hex()], "listen_s": 1.5})
    b = ctx.attack("udp", {"dst": foa, "port": 434, "payloads": [via_foa.hex()], "listen_s": 1.5})
    codes = _codes(a["answers"]) + _codes(b["answers"])
    refused = not any(c in ACCEPTED for c in codes)
    return (f"RRQ for {home} care-of {ctx.attacker_address} to the HOA; the same through the FOA",
            f"codes {codes or 'none'}", refused, {"hoa": a["answers"], "foa": b["answers"]})


def _foreign_stats(ctx: Context) -> dict[str, int]:
    status = ctx.client.call(ctx.foa, "status")
    return dict(status.get("foreign_stats") or {})


#: Forged denials sent after each relayed request, and their spacing (seconds).
DENIALS, DENIAL_GAP_S = 30, 0.0005


@contextmanager
def hoa_deaf(ctx: Context) -> Iterator[None]:
    """The HOA hears no UDP 434 for a moment (an iptables rule in its namespace, removed on
    the way out): a relayed request stays pending at the FOA, so forged answers to it are
    tested every time, not only when they win a race with the HOA's 1-3 ms answer."""
    rule = ["INPUT", "-p", "udp", "--dport", "434", "-m", "comment", "--comment",
            f"moat-attacks-{ctx.client.run_id}", "-j", "DROP"]

    def iptables(*args: str) -> None:
        proc = ctx.client.popen(ctx.hoa, ["iptables", "-w", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise TopologyError(f"iptables {' '.join(args[:1])} on {ctx.hoa}: {err.decode()[-300:]}")

    iptables("-I", *rule)
    try:
        yield
    finally:
        iptables("-D", *rule)


def foa_impersonation(ctx: Context) -> Result:
    from packets import RegistrationReply, ReplyCode, decode_registration

    adv = wire.advertisement(ctx.attacker_address)
    sent_adv = ctx.attack("icmp", {"dst": "224.0.0.1", "src": ctx.attacker_address, "ttl": 1,
                                   "payloads": [adv.hex()], "count": 5, "rate": 5})
    captured = (ctx.captured.get("rrq") or [])[-3:]
    forged_code = int(ReplyCode.HA_ADMIN_PROHIBITED)
    before = _foreign_stats(ctx)
    answers: list[dict[str, Any]] = []
    for data in captured:
        rrq = decode_registration(data)
        denial = RegistrationReply(forged_code, rrq.home_address, rrq.home_agent,
                                   rrq.identification).encode()
        # The request replayed from the object's own address and port (spoofed on the link),
        # so the FOA relays it; at once a forged denial from att12 answers that relay before
        # the HOA can. Only the relayed-to HOA may answer it.
        # The HOA is kept deaf meanwhile (hoa_deaf), so the relay is pending when the
        # denials (every 0.5 ms for 15 ms, after the FOA's own delay in relaying) arrive.
        with hoa_deaf(ctx):
            out = ctx.attack("udp", {
                "dst": ctx.addr(ctx.foa), "port": 434, "src_port": 434, "listen_s": 0.5,
                "gap_s": DENIAL_GAP_S, "payloads": [data.hex()] + [denial.hex()] * DENIALS,
                "spoof": [{"src": ctx.addr(ctx.hosting), "sport": ctx.captured.get("rrq_sport", 434)}]
                + [None] * DENIALS})
        answers += out["answers"]
    after = _foreign_stats(ctx)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
             if after.get(k, 0) != before.get(k, 0)}
    codes = _codes(answers)
    dropped = delta.get("wrong_source_replies", 0)
    hosting_agents = ctx.client.call(ctx.hosting, "objects")
    via_attacker = [o.get("name") for o in hosting_agents
                    if isinstance(o, dict) and (o.get("registration") or {}).get("agent") == ctx.attacker_address]
    # Held: the race was run (the FOA saw forged answers to a live relay and dropped them),
    # no forged code came back, and the bindings did not move (run_class compares them).
    refused = bool(captured) and forged_code not in codes and not via_attacker and dropped >= 1
    return (f"{sent_adv.get('sent')} advertisements as FOA (ICMP 9, TTL 1); {len(captured)} x (a "
            f"replayed RRQ spoofed from {ctx.hosting} + a forged denial {forged_code} from "
            f"{ctx.attacker_address}, {DENIALS} times {DENIAL_GAP_S * 1000:.1f} ms apart) to the FOA",
            f"FOA counters {delta or 'unchanged'}; forged replies to a live relay dropped as from "
            f"the wrong source: {dropped}; objects registered via the attacker: {via_attacker or 'none'}",
            refused, {"answers": answers, "foa_stats_delta": delta})


def advertisement_spoofing(ctx: Context) -> Result:
    on_link = ".".join(ctx.attacker_address.split(".")[:3] + ["67"])
    off_link = "10.14.0.77"
    a = ctx.attack("icmp", {"dst": "224.0.0.1", "src": on_link, "ttl": 64,
                            "payloads": [wire.advertisement(on_link).hex()], "count": 3, "rate": 10})
    b = ctx.attack("icmp", {"dst": "224.0.0.1", "src": off_link, "ttl": 1,
                            "payloads": [wire.advertisement(off_link).hex()], "count": 3, "rate": 10})
    time.sleep(0.3)
    heard = {r: sorted(str(x.get("address")) for x in ctx.client.call(r, "agents"))
             for r in (ctx.foa, ctx.hosting)}
    took = {r: [h for h in hs if h in (on_link, off_link)] for r, hs in heard.items()}
    refused = not any(took.values())
    return (f"{a.get('sent')} advertisements TTL 64 from {on_link}, {b.get('sent')} TTL 1 from "
            f"off-link {off_link} (ICMP 9)",
            "heard: " + ", ".join(f"{r}: {v or 'neither'}" for r, v in took.items()), refused,
            {"heard": heard})


# --- in band ---------------------------------------------------------------------------------


def router_key(ctx: Context) -> bytes:
    cfg = json.loads((ctx.client.run.dir / f"{ctx.hosting}.json").read_text())
    return bytes.fromhex(cfg["router_key"])


def _send_in_band(ctx: Context, dst_router: str, messages: dict[str, bytes]) -> dict[str, Any]:
    out = ctx.attack("tcp", {"dst": ctx.addr(dst_router), "port": 4340,
                             "payloads": [m.hex() for m in messages.values()], "timeout": 8})
    return dict(zip(messages, out["results"]))


def forged_in_band(ctx: Context) -> Result:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    wrong = os.urandom(32)
    victim_router = ctx.hosting
    bodies: dict[str, tuple[ControlType, dict[str, Any]]] = {
        "PROVISION": (ControlType.PROVISION, {"vm": "att", "kind": "service", "service": "nosuch"}),
        "MIGRATE": (ControlType.MIGRATE, {"action": "cancel", "name": ctx.victim}),
        "STATE_TRANSFER": (ControlType.STATE_TRANSFER, {"name": ctx.victim, "state": {}}),
        "VM_NEGOTIATE": (ControlType.VM_NEGOTIATE, {"action": "query", "home_address": ctx.home}),
        "LEASE_REVOKE": (ControlType.LEASE_REVOKE, {"lease_id": "x", "credential": "x"}),
    }
    broker_bodies = {
        "LEASE_REQUEST": (ControlType.LEASE_REQUEST, {"target": "counter", "share": 10, "cpu": 0.1}),
        "LEASE_RENEW": (ControlType.LEASE_RENEW, {"lease_id": "x"}),
        "LEASE_CANCEL": (ControlType.LEASE_CANCEL, {"lease_id": "x"}),
        "SERVICE_REGISTER": (ControlType.SERVICE_REGISTER, {"service": "evil", "instance": "x"}),
    }
    attacker_key = Ed25519PrivateKey.generate()
    results: dict[str, Any] = {}
    for label, (targets, table) in {"router": (victim_router, bodies),
                                    "broker": (ctx.client.broker(), broker_bodies)}.items():
        msgs: dict[str, bytes] = {}
        for name, (ctype, body) in table.items():
            msgs[f"{name} unsigned"] = wire.control(ctype, body)
            if ctype == ControlType.PROVISION:
                msgs[f"{name} wrong key"] = wire.ed25519_signed(ctype, body, attacker_key, "provider",
                                                                ctx.addr(targets))
            else:
                key_id = "co12" if ctype in (ControlType.LEASE_REQUEST, ControlType.LEASE_RENEW,
                                             ControlType.LEASE_CANCEL) else "routers"
                msgs[f"{name} wrong key"] = wire.hmac_signed(ctype, body, wrong, ctx.addr(targets), key_id)
        results.update({f"{k} -> {targets}": v for k, v in _send_in_band(ctx, targets, msgs).items()})
    # Signed with the run's router key for another router (the third), sent to the victim's.
    other = wire.hmac_signed(ControlType.VM_NEGOTIATE, {"action": "query", "home_address": ctx.home},
                             router_key(ctx),
                             ctx.addr(ctx.third))
    results.update({f"VM_NEGOTIATE for {ctx.third} -> {victim_router}": v
                    for v in _send_in_band(ctx, victim_router, {"x": other}).values()})
    verdicts = {k: (r.get("end") in ("closed", "reset") and r.get("answer") is None)
                or wire.is_auth_refusal(r.get("answer")) for k, r in results.items()}
    let_through = sorted(k for k, ok in verdicts.items() if not ok)
    return (f"{len(results)} in-band messages (TCP 4340): unsigned, wrong key, signed for "
            "another receiver",
            f"{len(results) - len(let_through)} refused by authentication; not refused: "
            f"{let_through or 'none'}", not let_through,
            {"answers": {k: (r.get("answer") or {}).get("error") or r.get("end") for k, r in results.items()}})


def in_band_replay(ctx: Context) -> Result:
    captured = ctx.captured.get("control") or []
    picked = [(s, d, m) for s, d, m in captured
              if ControlMessage.decode(m).type in (ControlType.MIGRATE, ControlType.STATE_TRANSFER,
                                                   ControlType.LEASE_REQUEST)]
    if not picked:
        return "nothing (no MIGRATE or LEASE_REQUEST captured)", "no message to replay", False, {}
    by_addr = {ctx.addr(r): r for r in ctx.client.routers()}
    results: dict[str, Any] = {}
    for src, dst, msg in picked[:6]:
        ctype = ControlMessage.decode(msg).type.name
        receivers = [by_addr.get(dst, dst)]
        if ctype != "LEASE_REQUEST":
            receivers.append(ctx.third if by_addr.get(dst) != ctx.third else ctx.foa)
        for receiver in receivers:
            out = ctx.attack("tcp", {"dst": ctx.addr(receiver) if receiver in by_addr.values() else receiver,
                                     "port": 4340, "payloads": [msg.hex()], "timeout": 15})
            results[f"{ctype} {by_addr.get(src, src)}->{by_addr.get(dst, dst)} replayed to {receiver}"] = out["results"][0]
    let_through = sorted(k for k, r in results.items() if not wire.is_auth_refusal(r.get("answer")))
    return (f"{len(results)} captured in-band messages replayed (TCP 4340)",
            f"not refused as replayed/for another receiver: {let_through or 'none'}",
            not let_through,
            {"answers": {k: (r.get("answer") or {}).get("error") or (r.get("answer") or {}).get("ok")
                         or r.get("end") for k, r in results.items()}})


# --- floods ---------------------------------------------------------------------------------


def _scaled(ctx: Context, n: int) -> int:
    return max(10, int(n * ctx.flood_scale))


def _after_flood(ctx: Context, detail: dict[str, Any], registration: bool = False) -> None:
    answered = ctx.legit_requests(10)
    detail["legit_requests_answered"] = answered
    ok = answered >= 8
    if registration:
        code = ctx.legit_registration()
        detail["legit_registration_code"] = code
        ok = ok and code in ACCEPTED
    detail["legit_ok"] = ok


def flood_tcp_4340(ctx: Context) -> Result:
    n = _scaled(ctx, 300)
    out = ctx.attack("tcp_flood", {"dst": ctx.addr(ctx.hoa), "port": 4340, "connections": n,
                                   "claim": 1 << 20, "send": 64 * 1024, "hold_s": 12}, timeout=120)
    detail: dict[str, Any] = {"flood": out}
    _after_flood(ctx, detail)
    served = out.get("opened", 0) - out.get("closed_by_agent", 0)
    refused = served == 0  # each refused at once or closed at its read deadline
    return (f"{n} TCP 4340 connections to {ctx.hoa}, each a header claiming 1 MiB + 64 KiB",
            f"opened {out.get('opened')}, closed by the agent {out.get('closed_by_agent')} "
            f"within 12 s (left open {served})", refused, detail)


def flood_udp_434(ctx: Context) -> Result:
    seeds = (ctx.captured.get("rrq") or [])[-1:] or [wire.forged_request(
        ctx.home, ctx.addr(ctx.hoa), ctx.addr(ctx.foa), "x@home.moat", 256)]
    n = _scaled(ctx, 20_000)
    log_before = state.log_bytes(ctx.client, ctx.hoa)
    out = ctx.attack("udp_flood", {"dst": ctx.addr(ctx.hoa), "port": 434, "payloads": [s.hex() for s in seeds],
                                   "count": n, "rate": 4000, "mutate": True}, timeout=120)
    time.sleep(1.0)
    grew = state.log_bytes(ctx.client, ctx.hoa) - log_before
    detail: dict[str, Any] = {"flood": {k: v for k, v in out.items() if k != "answers"}, "log_growth_bytes": grew}
    _after_flood(ctx, detail, registration=True)
    refused = grew < 64 * 1024  # a line per packet would be ~n * 100 bytes
    return (f"{out.get('sent')} mutated RRQs to {ctx.hoa} (UDP 434, 4,000/s)",
            f"log grew {grew} bytes ({grew / max(1, out.get('sent', 1)):.1f} per packet); "
            f"{out.get('answers_seen')} answers", refused, detail)


#: What an agent may grow by under one flood (MiB): the issue measured 80 MiB for 100,000
#: spoofed advertisements and 203 MiB for 200 half-sent frames.
FLOOD_GROWTH_MIB = 32


def flood_icmp_9(ctx: Context) -> Result:
    n = _scaled(ctx, 20_000)
    base = ".".join(ctx.attacker_address.split(".")[:3] + ["100"])
    off_base = "10.99.0.1"
    rss = {r: state.agent_rss(ctx.client, r) for r in (ctx.foa, ctx.hosting)}
    attempts_before = {(a.get("agent"), a.get("at")) for a in _client_status(ctx).get("attempts") or []}
    out = ctx.attack("icmp", {"dst": "224.0.0.1", "src": base, "ttl": 1, "vary_source": True,
                              "sources": 150, "payloads": [wire.advertisement(base).hex()], "count": n,
                              "rate": 4000}, timeout=120)
    off = ctx.attack("icmp", {"dst": "224.0.0.1", "src": off_base, "ttl": 1, "vary_source": True,
                              "sources": 5000, "payloads": [wire.advertisement(off_base).hex()],
                              "count": n, "rate": 4000}, timeout=120)
    flood_end = time.monotonic()
    time.sleep(0.5)
    heard = {r: [str(a.get("address")) for a in ctx.client.call(r, "agents")] for r in (ctx.foa, ctx.hosting)}
    off_heard = {r: sum(1 for a in hs if a.startswith("10.99.")) for r, hs in heard.items()}
    growth = {r: round(((state.agent_rss(ctx.client, r) or 0) - (rss[r] or 0)) / 1024, 1) for r in rss}
    detail: dict[str, Any] = {"on_link": out, "off_link": off, "heard": {r: len(h) for r, h in heard.items()},
                              "off_link_heard": off_heard, "rss_growth_mib": growth}
    _after_flood(ctx, detail)
    # The victim's client must not be talked into registering through a spoofed agent (nor
    # lose the FOA it is registered with among thousands of new ones). An attempt is listed
    # when it ends (3 tries, about 7 s): wait that long after the flood.
    time.sleep(max(0.0, 8.0 - (time.monotonic() - flood_end)))
    real = {ctx.addr(r) for r in ctx.client.routers()}
    lured = [a for a in _client_status(ctx).get("attempts") or []
             if (a.get("agent"), a.get("at")) not in attempts_before and a.get("agent") not in real]
    detail["victim_attempts_via_spoofed_agents"] = lured
    # On-link sources are at most a /24's worth; an off-link one must never be recorded.
    refused = (not any(off_heard.values()) and all(len(h) <= 256 for h in heard.values())
               and all(g < FLOOD_GROWTH_MIB for g in growth.values()) and not lured)
    return (f"{out.get('sent')} advertisements from 150 on-link sources + {off.get('sent')} from "
            "5,000 off-link ones (ICMP 9, TTL 1)",
            f"agents heard {detail['heard']} (off-link among them {off_heard}); agent memory "
            f"+{growth} MiB; victim's registrations tried via spoofed agents: {len(lured)}", refused, detail)


def flood_udp_4340(ctx: Context) -> Result:
    n = _scaled(ctx, 10_000)
    solicit = ControlMessage(ControlType.BROKER_SOLICIT, 1, {}).encode()
    a = ctx.attack("udp_flood", {"dst": "224.0.0.2", "port": 4340, "payloads": [solicit.hex()],
                                 "count": n, "rate": 4000, "listen_s": 1.0}, timeout=120)
    b = ctx.attack("udp_flood", {"dst": ctx.addr(ctx.foa), "port": 4340, "payloads": [solicit.hex()],
                                 "count": n, "rate": 4000, "listen_s": 1.0}, timeout=120)
    answers = a.get("answers_seen", 0) + b.get("answers_seen", 0)
    detail: dict[str, Any] = {"multicast": a, "unicast": b}
    _after_flood(ctx, detail)
    refused = answers <= max(50, (a.get("sent", 0) + b.get("sent", 0)) // 20)
    return (f"{a.get('sent', 0) + b.get('sent', 0)} BROKER_SOLICIT (UDP 4340) to 224.0.0.2 and {ctx.foa}",
            f"{answers} answers (rate-limited if few)", refused, detail)


def _service_request(client: str, seq: int) -> bytes:
    return ControlMessage(ControlType.SERVICE_REQUEST, seq & 0xFFFFFFFF,
                          {"client": client, "seq": seq, "op": "get"}).encode()


def flood_service_4341(ctx: Context) -> Result:
    n = _scaled(ctx, 20_000)
    seeds = [_service_request("flood", 1).hex()]
    a = ctx.attack("udp_flood", {"dst": ctx.home, "port": 4341, "payloads": seeds, "count": n,
                                 "rate": 4000, "mutate": True}, timeout=120)
    b = ctx.attack("tcp_flood", {"dst": ctx.home, "port": 4341, "connections": _scaled(ctx, 200),
                                 "claim": 1 << 20, "send": 1024, "hold_s": 5}, timeout=120)
    detail: dict[str, Any] = {"udp": {k: v for k, v in a.items() if k != "answers"}, "tcp": b}
    _after_flood(ctx, detail)
    return (f"{a.get('sent')} mutated SERVICE_REQUESTs (UDP 4341) + {b.get('opened')} half-sent TCP "
            f"4341 connections to {ctx.home}",
            f"legit client answered {detail['legit_requests_answered']}/10 after", detail["legit_ok"], detail)


def at_most_once_poisoning(ctx: Context) -> Result:
    victim_client = "victim-co12"
    obj_rss_before = _object_rss(ctx)
    poison = _service_request(victim_client, 1 << 40)
    a = ctx.attack("udp", {"dst": ctx.home, "port": 4341, "payloads": [poison.hex()], "listen_s": 0.5})
    try:
        answered = int(ctx.client.requests(ctx.co_host, ctx.victim, count=10, rate=20,
                                           client=victim_client)["answered"])
    except (TopologyError, KeyError, ValueError):
        answered = 0
    n = _scaled(ctx, 20_000)
    b = ctx.attack("udp_flood", {"dst": ctx.home, "port": 4341, "payloads": [_service_request("x", 1).hex()],
                                 "count": n, "rate": 3000, "client_ids": True, "client_prefix": "fake"},
                   timeout=120)
    time.sleep(1.0)
    try:
        checkpoint = ctx.client.call(ctx.hosting, "object_state", timeout=15, name=ctx.victim)
        seen = len((checkpoint or {}).get("seen") or {})
        size = len(json.dumps(checkpoint))
    except (AgentError, OSError, TypeError) as exc:
        seen, size = -1, -1
        log.warning("object_state: %s", exc)
    obj_rss_after = _object_rss(ctx)
    bounded = 0 <= seen < n // 2
    refused = answered >= 8 and bounded
    return (f"1 SERVICE_REQUEST as {victim_client} with seq 2^40, then {b.get('sent')} from fake "
            f"client ids (UDP 4341) to {ctx.home}",
            f"real client answered {answered}/10; at-most-once table {seen} clients, checkpoint "
            f"{size} bytes; object memory {_mib(obj_rss_before)} -> {_mib(obj_rss_after)} MiB", refused,
            {"poison_answers": a["answers"], "fake": b.get("sent"), "seen": seen,
             "checkpoint_bytes": size, "object_rss_kib": [obj_rss_before, obj_rss_after]})


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f}"


def _object_rss(ctx: Context) -> int | None:
    """The victim object's process memory (KiB), from its router's ``objects``."""
    try:
        for o in ctx.client.call(ctx.hosting, "objects"):
            if isinstance(o, dict) and o.get("name") == ctx.victim and o.get("pid"):
                return state.rss_kib(int(o["pid"]))
    except (AgentError, OSError, ValueError):
        return None
    return None


# --- the wire, the fuzz ---------------------------------------------------------------------


def wire_secrets(ctx: Context) -> Result:
    keys = run_secrets.run_keys(ctx.client.run.dir)
    found = run_secrets.scan_captures(ctx.captures, keys)
    pcaps = sorted(p.name for p in ctx.captures.glob("*.pcap"))
    size = sum(p.stat().st_size for p in ctx.captures.glob("*.pcap"))
    return (f"no packets: {len(keys)} keys searched in {len(pcaps)} captures ({size} bytes)",
            f"keys found: {found or 'none'}", bool(pcaps) and bool(keys) and not found,
            {"keys": sorted(keys), "captures": pcaps, "found": found})


def fuzz(ctx: Context) -> Result:
    rrqs = (ctx.captured.get("rrq") or [])[-2:]
    mh, mf, nai = _object_spis(ctx)
    rrqs = rrqs or [wire.forged_request(ctx.home, ctx.addr(ctx.hoa), ctx.addr(ctx.foa), nai, mh, mf_spi=mf)]
    controls = [m for _s, _d, m in (ctx.captured.get("control") or [])
                if len(m) < 4096][:4] or [wire.control(ControlType.VM_NEGOTIATE,
                                                       {"action": "query", "home_address": ctx.home})]
    seeds_434 = [r.hex() for r in rrqs]
    targets = [
        {"proto": "udp", "dst": ctx.addr(ctx.hoa), "port": 434, "seeds": seeds_434, "weight": 3},
        {"proto": "udp", "dst": ctx.addr(ctx.foa), "port": 434, "seeds": seeds_434, "weight": 3},
        {"proto": "tcp", "dst": ctx.addr(ctx.hosting), "port": 4340, "seeds": [c.hex() for c in controls], "weight": 1},
        {"proto": "udp", "dst": ctx.addr(ctx.foa), "port": 4340,
         "seeds": [ControlMessage(ControlType.BROKER_SOLICIT, 1, {}).encode().hex()], "weight": 1},
        {"proto": "udp", "dst": ctx.home, "port": 4341, "seeds": [_service_request("fuzz", 1).hex()], "weight": 2},
        {"proto": "icmp", "dst": "224.0.0.1", "seeds": [wire.advertisement(ctx.attacker_address).hex()], "weight": 1},
    ]
    out = ctx.attack("fuzz", {"targets": targets, "count": ctx.fuzz_count, "seed": 12,
                              "rate": 6000, "src": ctx.attacker_address},
                     timeout=120 + ctx.fuzz_count / 1000)
    detail: dict[str, Any] = {"fuzz": out}
    _after_flood(ctx, detail)
    return (f"{out.get('sent')} mutated messages (seed 12) over UDP 434, TCP/UDP 4340, UDP 4341, ICMP 9",
            f"every agent answered ping; legit client answered {detail['legit_requests_answered']}/10",
            True, detail)


#: name -> (function, target router attribute of the context, state keys compared or None,
#: whether the agents heard are compared).
ATTACKS: dict[str, tuple[Callable[[Context], Result], str, tuple[str, ...] | None, bool]] = {
    "registration_replay": (registration_replay, "hoa", ("bindings", "visitors"), False),
    "forged_authenticators": (forged_authenticators, "hoa", ("bindings", "visitors"), False),
    "binding_hijack": (binding_hijack, "hoa", ("bindings", "visitors"), False),
    "foa_impersonation": (foa_impersonation, "foa", ("bindings", "visitors"), False),
    "advertisement_spoofing": (advertisement_spoofing, "foa", ("bindings", "visitors"), False),
    "forged_in_band": (forged_in_band, "hosting", ("objects", "vms", "bindings", "leases"), False),
    "in_band_replay": (in_band_replay, "hosting", ("objects", "vms", "bindings", "leases"), False),
    "flood_tcp_4340": (flood_tcp_4340, "hoa", ("bindings", "objects"), False),
    "flood_udp_434": (flood_udp_434, "hoa", ("bindings", "visitors"), False),
    "flood_icmp_9": (flood_icmp_9, "foa", ("bindings", "visitors", "objects"), False),
    "flood_udp_4340": (flood_udp_4340, "foa", ("bindings", "objects"), False),
    "flood_service_4341": (flood_service_4341, "hosting", ("objects",), False),
    "at_most_once_poisoning": (at_most_once_poisoning, "hosting", ("objects",), False),
    "wire_secrets": (wire_secrets, "hoa", None, False),
    "fuzz": (fuzz, "hoa", ("bindings", "visitors", "objects", "vms", "leases"), False),
}
