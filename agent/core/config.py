"""Agent configuration: what a router's daemon is (roles, interfaces, credentials).

The topology writes one JSON file per router into the run directory and starts
``python -m agent --config FILE``. Keys are hex strings in JSON and ``bytes`` here. The three
credential sets of the patent map onto RFC 5944 security associations:

* object ↔ HOA: Mobile-Home key (patent: HOA credentials 130), per object at the HOA;
* object ↔ FOA: Mobile-Foreign key (FOA credentials 126 / MO credentials list 154);
* FOA ↔ HOA: Foreign-Home key (FOA credentials list 144 at the HOA).
"""

from __future__ import annotations

import ipaddress

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.core.errors import ConfigError

ROLES = frozenset({"home", "foreign"})


PARTS = ("primary", "duplicate", "secondary")


def _part(value: Any) -> str:
    if value not in PARTS:
        raise ConfigError(f"part must be one of {PARTS}, not {value!r}")
    return str(value)


def _part_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ConfigError(f"part_id must be an integer in [0, 65535], not {value!r}")
    return value


def _address(value: Any) -> str:
    if value in ("", None):
        return ""
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError as exc:
        raise ConfigError(f"care_of_address {value!r}: {exc}") from None


def _prefix(value: Any) -> str:
    if value in ("", None):
        return ""
    try:
        return str(ipaddress.IPv4Network(str(value)))
    except ValueError as exc:
        raise ConfigError(f"network_prefix {value!r}: {exc}") from None


def _flag(value: Any, name: str) -> bool:
    """A JSON boolean; the string "false" must not read as True."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false, not {value!r}")


@dataclass
class Interface:
    """A router interface the agent advertises on."""

    name: str
    address: str
    prefix: int = 24
    #: Agents advertise on access links (LANs) only, never on backbone links.
    advertise: bool = True


@dataclass
class Credential:
    """A security association: SPI (>= 256) and HMAC key."""

    spi: int
    key: bytes

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Credential":
        try:
            spi = int(data["spi"])
            key = bytes.fromhex(data["key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad credential {data!r}: {exc}") from None
        if spi < 256 or not key:
            raise ConfigError(f"credential SPI {spi} < 256 or empty key")
        return cls(spi, key)

    def to_json(self) -> dict[str, Any]:
        return {"spi": self.spi, "key": self.key.hex()}


@dataclass
class HomeObject:
    """An object this HOA serves: its home address, name and Mobile-Home credential."""

    home_address: str
    nai: str
    mobile_home: Credential
    #: The mobile network prefix it may register ("10.16.0.224/30"; "" none): its
    #: secondary objects' addresses (NEMO, RFC 5177).
    network_prefix: str = ""


@dataclass
class HomeConfig:
    """The home object agent role."""

    objects: list[HomeObject] = field(default_factory=list)
    trusted_foas: list[Credential] = field(default_factory=list)
    max_bindings: int = 4
    max_lifetime: int = 300
    replay_window: float = 7.0
    #: The interface on the home LAN where the HOA answers ARP for away objects.
    home_interface: str = ""


@dataclass
class ForeignConfig:
    """The foreign object agent role."""

    trusted_objects: list[Credential] = field(default_factory=list)
    foreign_home: Credential | None = None
    max_visitors: int = 64
    max_lifetime: int = 300


#: CPUs, MiB and processes: room for the runtime (~25 MiB) and a small object's work.
DEFAULT_OBJECT_RESOURCES: dict[str, Any] = {"cpu": 1.0, "memory_mb": 256, "pids": 64}


@dataclass
class BrokerConfig:
    """Where the run's service broker is (every router: they advertise it on their LANs and
    register their VMs' services with it) and, on the broker's own router, what it needs."""

    #: The address corresponding objects and routers send broker messages to (TCP 4340).
    address: str
    #: Seconds between broker advertisements on each LAN.
    advertise_interval: float = 1.0
    #: True on the router that runs the broker role.
    serve: bool = False
    #: Corresponding objects' keys (id -> key): LEASE_* messages carry an HMAC under them.
    co_keys: dict[str, bytes] = field(default_factory=dict)
    #: Lease policy: "any" gets the default; nothing is granted longer than the maximum.
    lease_default_s: float = 60.0
    lease_max_s: float = 300.0
    #: Hops from each network (prefix) to each router (name): the path cost between a
    #: corresponding object's network and a service instance.
    network_hops: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Every router of the run (name -> address for TCP 4340): where a service's primary
    #: looks for room for a duplicate (Fig. 12, step 210).
    routers: dict[str, str] = field(default_factory=dict)
    #: Instances of one service at most (the primary and its duplicates).
    max_instances: int = 3

    def network_of(self, address: str | None) -> str:
        """The run's network (a key of :attr:`network_hops`, ``"10.14.0.0/24"``) that
        ``address`` is on; "" when unknown or not an address."""
        if not address:
            return ""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return ""
        return next((prefix for prefix in self.network_hops
                     if ip in ipaddress.ip_network(prefix, strict=False)), "")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BrokerConfig":
        return cls(
            address=str(data["address"]),
            advertise_interval=float(data.get("advertise_interval", 1.0)),
            serve=_flag(data.get("serve", False), "broker.serve"),
            co_keys={str(k): bytes.fromhex(v) for k, v in data.get("co_keys", {}).items()},
            lease_default_s=float(data.get("lease_default_s", 60.0)),
            lease_max_s=float(data.get("lease_max_s", 300.0)),
            network_hops={str(n): {str(r): int(h) for r, h in hops.items()}
                          for n, hops in data.get("network_hops", {}).items()},
            routers={str(r): str(a) for r, a in data.get("routers", {}).items()},
            max_instances=int(data.get("max_instances", 3)),
        )


@dataclass
class PeerRouter:
    """Another router of the run as a sender of in-band messages sees it: its addresses and
    its X25519 public key, which secrets sent to it are sealed for (agent.core.sealing)."""

    addresses: list[str]
    seal_key: bytes

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> "PeerRouter":
        try:
            addresses = [str(ipaddress.IPv4Address(str(a))) for a in data["addresses"]]
            key = bytes.fromhex(data["seal_key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad peer router {name!r}: {exc!r}") from None
        if len(key) != 32 or not addresses:
            raise ConfigError(f"peer router {name!r} needs addresses and a 32-byte seal_key")
        return cls(addresses, key)


@dataclass(frozen=True)
class StaticRoute:
    """One static route the topology gives this router (``ip route replace PREFIX via VIA``
    at start): the static-routes role installs it again when a link that took it comes back
    (agent.routing.static_routes), and touches no other route."""

    #: The destination, ``a.b.c.d/len`` with no host bits.
    prefix: str
    #: The next hop, an IPv4 address on one of the router's links.
    via: str

    @classmethod
    def from_json(cls, data: Any) -> "StaticRoute":
        if not isinstance(data, dict) or not isinstance(data.get("prefix"), str) \
                or not isinstance(data.get("via"), str):
            raise ConfigError(f"a static route is {{\"prefix\": \"a.b.c.d/len\", \"via\": "
                              f"\"a.b.c.d\"}}, not {data!r}")
        return cls(data["prefix"], data["via"])

    def check(self) -> "StaticRoute":
        """The same route in canonical form; :class:`ConfigError` when either part is not
        IPv4 (a prefix without its length, or with host bits set, is refused too)."""
        if not isinstance(self.prefix, str) or "/" not in self.prefix:
            raise ConfigError(f"static route prefix {self.prefix!r} is not a.b.c.d/len")
        try:
            prefix = ipaddress.IPv4Network(self.prefix)
        except ValueError as exc:
            raise ConfigError(f"static route prefix {self.prefix!r}: {exc}") from None
        try:
            via = ipaddress.IPv4Address(self.via)
        except ValueError as exc:
            raise ConfigError(f"static route {self.prefix} next hop {self.via!r}: {exc}") from None
        return StaticRoute(str(prefix), str(via))


@dataclass
class AgentConfig:
    """Everything one daemon needs."""

    name: str
    run_dir: str
    roles: list[str]
    interfaces: list[Interface]
    advertise_interval: float = 1.0
    advertisement_lifetime: int = 9000
    home: HomeConfig | None = None
    foreign: ForeignConfig | None = None
    log_level: str = "INFO"
    #: GRE backend: "auto" (kernel where the kernel has GRE), "kernel" or "userspace".
    tunnel_backend: str = "auto"
    #: The VM baseline (agent.vm.manager.VmBaseline as JSON); None: this router runs no VMs.
    vm: dict[str, Any] | None = None
    run_id: str | None = None
    #: Sandbox resources of an object placed on this router without a VM (``object_start``,
    #: ``moat`` experiments); a provisioned VM's objects take their manifest's instead.
    object_resources: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OBJECT_RESOURCES))
    #: The run's router key (hex): MIGRATE and STATE_TRANSFER carry an HMAC under it
    #: (agent.core.msgauth). None: this agent sends them unsigned and refuses every one it gets.
    router_key: str | None = None
    #: The run's service broker; None: no broker in this run.
    broker: BrokerConfig | None = None
    #: This router's X25519 private key (hex): opens what other routers and the site seal
    #: for it (agent.core.sealing). None: a message carrying secrets is refused.
    seal_key: str | None = None
    #: Every router of the run (name -> addresses, X25519 public key): secrets sent to one
    #: are sealed for its key; a router not listed gets none.
    peers: dict[str, PeerRouter] = field(default_factory=dict)
    #: The static routes the topology installed on this router (its ``routes`` node param),
    #: which the static-routes role keeps installed; empty: it has none to keep.
    static_routes: list[StaticRoute] = field(default_factory=list)

    @property
    def addresses(self) -> set[str]:
        return {i.address for i in self.interfaces}

    def seal_keys(self) -> dict[str, bytes]:
        """Public sealing key by router address (every address of every peer router)."""
        return {a: p.seal_key for p in self.peers.values() for a in p.addresses}

    def seal_private(self) -> bytes | None:
        """This router's X25519 private key, or None."""
        return bytes.fromhex(self.seal_key) if self.seal_key else None

    @property
    def socket_path(self) -> Path:
        return Path(self.run_dir) / f"{self.name}.sock"

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir) / f"{self.name}.log"

    def validate(self) -> None:
        unknown = set(self.roles) - ROLES
        if unknown:
            raise ConfigError(f"unknown roles {sorted(unknown)}")
        if "home" in self.roles and self.home is None:
            raise ConfigError("home role without a home section")
        if "foreign" in self.roles and (self.foreign is None or self.foreign.foreign_home is None):
            raise ConfigError("foreign role needs a foreign section with foreign_home")
        if self.advertise_interval <= 0:
            raise ConfigError("advertise_interval must be > 0")
        if not self.interfaces:
            raise ConfigError("an agent needs at least one interface")
        if self.broker is not None and not (0 < self.broker.lease_default_s <= self.broker.lease_max_s):
            raise ConfigError("broker lease_default_s must be > 0 and <= lease_max_s")
        if self.broker is not None and self.broker.advertise_interval <= 0:
            raise ConfigError("broker advertise_interval must be > 0")
        if self.seal_key is not None:
            try:
                ok = len(bytes.fromhex(self.seal_key)) == 32
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError("seal_key must be a 32-byte X25519 private key in hex")
        if self.tunnel_backend not in ("auto", "kernel", "ebpf", "userspace"):
            raise ConfigError(f"tunnel_backend must be auto, kernel, ebpf or userspace, not "
                              f"{self.tunnel_backend!r}")
        self.static_routes = [r.check() for r in self.static_routes]
        prefixes = [r.prefix for r in self.static_routes]
        twice = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if twice:
            raise ConfigError(f"static routes name {twice} more than once (one next hop each)")

    # --- JSON ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        def conv(obj: Any) -> Any:
            if isinstance(obj, bytes):
                return obj.hex()
            if isinstance(obj, dict):
                return {k: conv(v) for k, v in obj.items()}
            if isinstance(obj, list):
                return [conv(v) for v in obj]
            return obj

        return conv(asdict(self))

    def write(self, path: Path) -> None:
        """Write it root-only from creation (it holds keys): a new file is made 0600 and
        renamed into place, so no reader ever sees it with wider permissions (issue 12)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.to_json(), indent=2))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AgentConfig":
        try:
            home = None
            if data.get("home"):
                h = data["home"]
                home = HomeConfig(
                    objects=[
                        HomeObject(o["home_address"], o["nai"], Credential.from_json(o["mobile_home"]),
                                   str(o.get("network_prefix", "")))
                        for o in h.get("objects", [])
                    ],
                    trusted_foas=[Credential.from_json(c) for c in h.get("trusted_foas", [])],
                    max_bindings=int(h.get("max_bindings", 4)),
                    max_lifetime=int(h.get("max_lifetime", 300)),
                    replay_window=float(h.get("replay_window", 7.0)),
                    home_interface=h.get("home_interface", ""),
                )
            foreign = None
            if data.get("foreign"):
                f = data["foreign"]
                foreign = ForeignConfig(
                    trusted_objects=[Credential.from_json(c) for c in f.get("trusted_objects", [])],
                    foreign_home=Credential.from_json(f["foreign_home"]) if f.get("foreign_home") else None,
                    max_visitors=int(f.get("max_visitors", 64)),
                    max_lifetime=int(f.get("max_lifetime", 300)),
                )
            cfg = cls(
                name=data["name"],
                run_dir=data["run_dir"],
                roles=list(data.get("roles", [])),
                interfaces=[Interface(**i) for i in data["interfaces"]],
                advertise_interval=float(data.get("advertise_interval", 1.0)),
                advertisement_lifetime=int(data.get("advertisement_lifetime", 9000)),
                home=home,
                foreign=foreign,
                log_level=data.get("log_level", "INFO"),
                tunnel_backend=data.get("tunnel_backend", "auto"),
                vm=data.get("vm"),
                run_id=data.get("run_id"),
                object_resources={**DEFAULT_OBJECT_RESOURCES, **data.get("object_resources", {})},
                router_key=data.get("router_key"),
                broker=BrokerConfig.from_json(data["broker"]) if data.get("broker") else None,
                seal_key=data.get("seal_key"),
                peers={str(n): PeerRouter.from_json(str(n), p)
                       for n, p in data.get("peers", {}).items()},
                static_routes=[StaticRoute.from_json(r) for r in data.get("static_routes", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad agent configuration: {exc!r}") from None
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: Path) -> "AgentConfig":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None


@dataclass
class ObjectConfig:
    """A registration client: the mobile object's side of Fig. 11 (run by a router for now)."""

    name: str
    home_address: str
    home_agent: str
    nai: str
    mobile_home: Credential
    mobile_foreign: Credential
    lifetime: int = 60
    simultaneous: bool = False
    reverse_tunnel: bool = False
    #: Register through this FOA address when it is heard (else: lowest address first).
    preferred_agent: str | None = None
    #: Which part of its service this instance is (patent Fig. 6): "primary" (the mobile
    #: object itself), "duplicate" (a full copy, 108/110) or "secondary" (a part, 112/114).
    #: Sent in the object-part NVSE of every registration; the HOA shows it per binding.
    part: str = "primary"
    part_id: int = 0
    #: The mobile network prefix it registers with its home agent ("" none): where its
    #: secondary objects answer; it is their home agent.
    network_prefix: str = ""
    #: Register with this care-of address of the FOA rather than the one it advertises
    #: first ("" none): a duplicate on an FOA's own router, beside an instance of the same
    #: object behind it, takes the FOA's second address (patent: "a second care-of-address").
    care_of_address: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ObjectConfig":
        try:
            return cls(
                name=data["name"],
                home_address=data["home_address"],
                home_agent=data["home_agent"],
                nai=data["nai"],
                mobile_home=Credential.from_json(data["mobile_home"]),
                mobile_foreign=Credential.from_json(data["mobile_foreign"]),
                lifetime=int(data.get("lifetime", 60)),
                simultaneous=_flag(data.get("simultaneous", False), "simultaneous"),
                reverse_tunnel=_flag(data.get("reverse_tunnel", False), "reverse_tunnel"),
                preferred_agent=data.get("preferred_agent"),
                part=_part(data.get("part", "primary")),
                part_id=_part_id(data.get("part_id", 0)),
                network_prefix=_prefix(data.get("network_prefix", "")),
                care_of_address=_address(data.get("care_of_address", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad object configuration: {exc!r}") from None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mobile_home"] = self.mobile_home.to_json()
        d["mobile_foreign"] = self.mobile_foreign.to_json()
        return d
