"""GRE tunnels between object agents: one interface, three backends (DESIGN §5).

* :class:`UserspaceTunnel` (``userspace.py``) — one TUN device plus one raw IP-protocol-47
  socket, driven by the daemon's asyncio loop. It needs nothing but ``/dev/net/tun``: MOAT's
  development and CI machines have no GRE module, so this is the backend CI exercises.
* :class:`KernelTunnel` (``kernel.py``) — GRE netdevs, one per ``(remote, key)``, bicast
  copies with a tc ``mirred`` action, for kernels that have ``ip_gre``.
* :class:`EbpfTunnel` (``ebpf.py``) — tc eBPF programs (``bpf/moat_gre.c``, compiled on first
  use) encapsulate on a veth's egress and decapsulate on every interface's ingress, with
  maps the agent keeps in step: kernel speed without ``ip_gre`` (issue 16).

All put the same RFC 2784 / RFC 2890 packets on the wire (the key is the binding id), and
all leave routing to the kernel:

* HOA: :meth:`~Tunnel.set_peers` routes an away object's home address into the tunnel; every
  packet the kernel routes there leaves as one GRE copy per binding (bicast, RFC 5944 ``S``).
* FOA: :meth:`~Tunnel.accept` lets GRE from one ``(remote, key)`` in; anything else is dropped
  and counted. The inner packet goes back to the kernel, which routes it on (the daemon adds
  ``<home>/32 via <router>`` itself when the object runs on another router).
* Reverse tunnelling (RFC 3024, ``T``): :meth:`~Tunnel.set_reverse` adds a source policy rule
  so that packets *from* a visitor's home address go back through the tunnel to its HOA.

The methods never wait for the kernel: they update the tunnel's tables and queue the route,
rule, link and tc changes on the agent's netlink worker (``base.py``); ``await
tunnel.settle()`` returns once those are applied and reports refusals.

:func:`make_tunnel` picks the backend (``choose.py``): ``"auto"`` uses :func:`detect_backend`
(the first of ``AUTO_ORDER`` whose probe passes here); ``"kernel"`` or ``"ebpf"`` where it
cannot run raises :class:`TunnelUnavailable` with the reason (``ebpf_probe.py`` loads the
programs in a throwaway namespace). :func:`open_tunnel` is
the same for a coroutine, and starts the tunnel.

Every packet handler catches its own errors and counts them in ``stats``: a malformed or
unexpected packet never raises into the daemon's loop.
"""

from agent.mobility.tunnel.base import (GRE_PROTO, REVERSE_PRIORITY, REVERSE_TABLE, STAT_KEYS,
                                        Ipv4Header, Tunnel, TunnelError, TunnelUnavailable,
                                        ipv4_addresses, parse_ipv4)
from agent.mobility.tunnel.choose import (AUTO_ORDER, BACKENDS, _probe_kernel_gre,
                                          detect_backend, make_tunnel, open_tunnel,
                                          probe_kernel_gre)
from agent.mobility.tunnel.ebpf import EbpfTunnel
from agent.mobility.tunnel.ebpf_probe import probe_ebpf
from agent.mobility.tunnel.kernel import MIRROR_PRIO, KernelTunnel
from agent.mobility.tunnel.userspace import (IP_PKTINFO, TUN_MTU, TUN_QUEUE, UserspaceTunnel)
from agent.core.netlink import GRE_KEY_FLAG

__all__ = [
    "AUTO_ORDER", "BACKENDS", "EbpfTunnel", "probe_ebpf", "GRE_KEY_FLAG", "GRE_PROTO", "IP_PKTINFO", "MIRROR_PRIO", "REVERSE_PRIORITY", "REVERSE_TABLE",
    "STAT_KEYS", "TUN_MTU", "TUN_QUEUE", "Ipv4Header", "KernelTunnel", "Tunnel", "TunnelError",
    "TunnelUnavailable", "UserspaceTunnel", "_probe_kernel_gre", "detect_backend",
    "ipv4_addresses", "make_tunnel", "open_tunnel", "parse_ipv4", "probe_kernel_gre",
]
