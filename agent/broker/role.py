"""The broker role: the service broker of Fig. 12 on one router (by default the HOA, r22b).

It wraps the pure :class:`agent.broker.broker.Broker` in the agent: in-band messages on TCP
4340 and the ``services``/``leases`` commands. Who may send what:

* corresponding objects (COs): LEASE_REQUEST, LEASE_RENEW, LEASE_CANCEL, SERVICE_LIST, each
  with an HMAC under the CO's own key (``auth.key_id`` names the CO, which is the lease's
  holder: a lease is bound to the credentials that asked for it);
* routers: SERVICE_REGISTER and SERVICE_DEREGISTER for their VMs' service instances, with an
  HMAC under the run's router key.

Service credentials are issued under per-service keys derived from the router key
(:meth:`ServiceKeys.derived`), so the instance's router derives the same key and no key is
ever sent. A lease that ends early (cancel, instance gone) is pushed to the instance's router
at once (LEASE_REVOKE, router HMAC), which tells its objects: a cancelled lease stops being
served well within a second. Expiry needs no message: the credential carries its expiry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from packets import ControlMessage, ControlType

from agent.broker.broker import Broker
from agent.broker.credentials import ServiceKeys
from agent.broker.directory import Instance
from agent.broker import wire
from agent.broker.admission import GrowthPolicy
from agent.broker.errors import BadRequest, LeaseDenied, NeedsGrowth
from agent.broker.growth import Growth
from agent.broker.leases import LeasePolicy, LeaseRequest
from agent.core import fields
from agent.core.msgauth import MessageAuthError, ReplayCache, sign_hmac, strip, verify_hmac
from agent.core.peer import PeerError, RouterKeyAuth, peer_call
from agent.core.role import InBand, Role

log = logging.getLogger(__name__)

#: The key id of the broker's authenticator on its answers to a CO.
BROKER_KEY_ID = "broker"
#: A request may carry measured costs for this many instances, at most.
MAX_COSTS = 256
#: The cost of an instance the CO could not measure (it did not answer its handshake).
UNMEASURED_MS = 1000.0

#: How long a cancel waits for the instance's router to confirm the revocation before the
#: CO is answered (the push goes on in the background after that).
REVOKE_WAIT_S = 0.8


class CoKeyAuth:
    """Authenticates a CO's message: HMAC under the key of the CO named in ``auth.key_id``,
    signed for the broker (``receivers``: its addresses). Each CO has its own replay cache,
    so one CO's messages never push another's out of memory."""

    def __init__(self, keys: dict[str, bytes], receivers: Any = ()) -> None:
        self.keys = keys
        self.receivers = frozenset(receivers)
        self.caches: dict[str, ReplayCache] = {}

    def __call__(self, msg: ControlMessage) -> dict[str, Any]:
        auth = msg.body.get("auth")
        key_id = auth.get("key_id") if isinstance(auth, dict) else None
        key = self.keys.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            raise LeaseDenied("bad_credentials", "unknown corresponding object")
        cache = self.caches.setdefault(key_id, ReplayCache())
        try:
            verify_hmac(msg.type, msg.txid, msg.body, key, cache, to=self.receivers)
        except MessageAuthError as exc:
            raise LeaseDenied("bad_credentials", str(exc)) from None
        return strip(msg.body)


def holder_of(msg: ControlMessage) -> str:
    """The CO a message comes from; call only after :class:`CoKeyAuth` accepted it."""
    return str(msg.body["auth"]["key_id"])


class BrokerRole(Role):
    """Directory, leases, admission, credentials and service paths, served in band."""

    name = "broker"

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.broker is not None and config.broker.serve

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        cfg = self.config.broker
        assert cfg is not None
        key = bytes.fromhex(self.config.router_key) if self.config.router_key else None
        self.router_key = key
        keys = ServiceKeys.derived(key) if key else ServiceKeys()
        self.broker = Broker(LeasePolicy(default_s=cfg.lease_default_s, max_s=cfg.lease_max_s),
                             admission_policy=GrowthPolicy(cfg.max_instances),
                             keys=keys, network_cost=self.network_cost,
                             network_of=self.network_of)
        self.growth = Growth(self.broker, key)
        # COs send to the broker's address (it is one of this router's).
        self.co_auth = CoKeyAuth(cfg.co_keys, {*self.config.addresses, cfg.address})
        self.router_auth = RouterKeyAuth.of(self.config)
        self.hops = cfg.network_hops
        #: A broker on loopback (a test's) takes loopback addresses from the wire too.
        self.loopback = any(ipaddress.ip_address(i.address).is_loopback
                            for i in self.config.interfaces)
        #: The requesting CO's measured round trips (instance id -> ms), for one request.
        self._measured: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    def in_band(self) -> dict[ControlType, InBand]:
        co, router = self.co_auth, self.router_auth
        return {
            ControlType.LEASE_REQUEST: InBand(self.on_request, co, answer=ControlType.LEASE_GRANT),
            ControlType.LEASE_RENEW: InBand(self.on_renew, co),
            ControlType.LEASE_CANCEL: InBand(self.on_cancel, co),
            ControlType.SERVICE_LIST: InBand(self.on_list, co),
            ControlType.SERVICE_REGISTER: InBand(self.on_register, router),
            ControlType.SERVICE_DEREGISTER: InBand(self.on_deregister, router),
        }

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.growth.cancel()

    # --- the CO's messages ---------------------------------------------------------------

    async def on_request(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        co_address = body.pop("co_address", None)
        if co_address is not None:  # where the CO is: it picks instances and where to grow
            co_address = wire.field(fields.address, co_address, "LEASE_REQUEST.co_address",
                                    loopback=self.loopback)
        measured = measured_costs(body.pop("costs", None))
        holder, request = holder_of(msg), body.get("request")
        try:
            grant = self._request(holder, request, co_address, measured)
        except NeedsGrowth as need:
            # Step 208 → 210: grow the service from its primary, one growth per service at
            # a time, then ask admission again (a request that waited may now fit).
            primary = need.instance
            assert isinstance(primary, Instance)
            async with self.growth.lock(primary.service):
                try:
                    grant = self._request(holder, request, co_address, measured)
                except NeedsGrowth as again:
                    req = LeaseRequest.from_dict(request)
                    await self.growth.grow(again.instance, req.share, req.cpu,  # type: ignore[arg-type]
                                           req.target, co_address)
                    grant = self._request(holder, request, co_address, measured)
        return self._signed(msg, ControlType.LEASE_GRANT, {"ok": True, "grant": grant.as_dict()})

    def _request(self, holder: str, request: Any, co_address: str | None,
                 measured: dict[str, float]) -> Any:
        self._measured = measured
        try:
            return self.broker.request_from(holder, request, co_address)
        finally:
            self._measured = {}

    async def on_renew(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        hop = self.broker.renew(_lease_id(body, "LEASE_RENEW"), holder_of(msg), _duration(body))
        return self._signed(msg, msg.type, {"ok": True, "hop": hop.as_dict()})

    async def on_cancel(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        lease = self.broker.cancel(_lease_id(body, "LEASE_CANCEL"), holder_of(msg))
        self.growth.push_releases()
        pushed = self.push_revocations()
        if pushed:
            # Answer once the instance's router has it (bounded): when the CO hears "cancelled",
            # the object already refuses the lease's credential.
            await asyncio.wait(pushed, timeout=REVOKE_WAIT_S)
        return self._signed(msg, msg.type, {"ok": True, "lease_id": lease.lease_id})

    async def on_list(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        return self._signed(msg, msg.type, {"ok": True, "services": self.broker.services()})

    def _signed(self, msg: ControlMessage, answer_type: ControlType,
                body: dict[str, Any]) -> dict[str, Any]:
        """An accepted answer, authenticated for the CO that asked: an HMAC under its own key
        (key id ``broker``) over the answer's type, the request's transaction id and the body,
        so a host posing as the broker cannot hand it a grant; its receiver is the CO's id.
        Refusals go unsigned: like a Mobile IP denial, a refusal grants nothing."""
        holder = holder_of(msg)
        return sign_hmac(answer_type, msg.txid, body, self.co_auth.keys[holder],
                         key_id=BROKER_KEY_ID, to=holder)

    # --- the routers' messages -----------------------------------------------------------

    async def on_register(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        self.broker.register_from(self.check_instance(body.get("instance")))
        return {"ok": True}

    def check_instance(self, doc: Any) -> Any:
        """A SERVICE_REGISTER ``instance``: on top of the directory's own checks, every
        address it gives (where it answers, its router, its parts) is a unicast IPv4 address
        in canonical form (:func:`agent.core.fields.address`) and its network an IPv4 prefix:
        a router cannot send COs to a multicast, loopback or malformed address."""
        doc = wire.as_mapping(doc, "instance")
        for key in ("address", "router_address"):
            if doc.get(key, "") != "" or key == "address":
                wire.field(fields.address, doc.get(key), f"instance.{key}",
                           loopback=self.loopback)
        parts = wire.as_mapping(doc.get("object_addresses", {}), "instance.object_addresses")
        if len(parts) > 64:
            raise BadRequest("instance.object_addresses: at most 64")
        for obj, address in parts.items():
            wire.field(fields.address, address, f"instance.object_addresses.{obj}",
                       loopback=self.loopback)
        if doc.get("network", "") != "":
            wire.field(fields.prefix, doc.get("network"), "instance.network")
        return doc

    async def on_deregister(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        ended = self.broker.remove_instance(
            wire.field(fields.identifier, body.get("instance_id"), "SERVICE_DEREGISTER.instance_id"))
        return {"ok": True, "leases_ended": len(ended)}

    # --- revocations and housekeeping ----------------------------------------------------

    def housekeeping(self) -> None:
        self.broker.expire()
        self.growth.push_releases()

    def push_revocations(self) -> list[asyncio.Task]:
        """Send each instance's router the leases cancelled since the last push; returns the
        sending tasks."""
        by_address: dict[str, list[dict[str, Any]]] = {}
        for row in self.broker.take_revocations():
            address = row.pop("address")
            by_address.setdefault(address, []).append(row)
        tasks = []
        for address, revoked in by_address.items():
            task = asyncio.get_running_loop().create_task(self._push(address, revoked))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            tasks.append(task)
        return tasks

    async def _push(self, address: str, revoked: list[dict[str, Any]]) -> None:
        try:
            await peer_call(address, ControlType.LEASE_REVOKE, {"revoked": revoked},
                            key=self.router_key, timeout=5.0)
        except PeerError as exc:
            log.warning("revocation of %d lease(s) at %s not delivered: %s", len(revoked), address, exc)

    def network_cost(self, co_address: str | None, instance: Instance) -> float:
        """The cost between the CO and the instance: the round trip the CO measured (ms),
        when its request carries measurements; else the hops between the CO's network and
        the instance's router in the run's routing (0 when unknown)."""
        if self._measured:
            return self._measured.get(instance.instance_id, UNMEASURED_MS)
        network = self.network_of(co_address)
        return float(self.hops[network].get(instance.router, 0)) if network else 0.0

    def network_of(self, co_address: str | None) -> str:
        """The run's network that ``co_address`` is on ("" when unknown)."""
        return self.config.broker.network_of(co_address)

    # --- control commands ----------------------------------------------------------------

    def cmd_services(self) -> list[dict]:
        return self.broker.services()

    def cmd_leases(self) -> list[dict]:
        return self.broker.leases()

    def cmd_growth(self) -> list[dict]:
        """Every growth asked of a primary's router: when, for what, where, how long."""
        return list(self.growth.history)

    def status(self) -> dict[str, Any]:
        return {"broker_stats": dict(self.broker.stats)}


def _lease_id(body: dict[str, Any], what: str) -> str:
    return wire.field(fields.token, body.get("lease_id"), f"{what}.lease_id")


def _duration(body: dict[str, Any]) -> Any:
    value = body.get("duration", "any")
    if value == "any":
        return "any"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise BadRequest('duration must be a number of seconds or "any"')


def measured_costs(doc: Any) -> dict[str, float]:
    """A request's ``costs`` (instance id -> measured round trip, ms), checked."""
    if doc is None:
        return {}
    if not isinstance(doc, dict) or len(doc) > MAX_COSTS:
        raise BadRequest(f"costs must map at most {MAX_COSTS} instance ids to milliseconds")
    out: dict[str, float] = {}
    for iid, ms in doc.items():
        wire.check_name(iid, "costs instance id")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms <= UNMEASURED_MS:
            raise BadRequest(f"costs[{iid!r}] must be a number of milliseconds from 0 to "
                             f"{UNMEASURED_MS:g}")
        out[iid] = float(ms)
    return out
