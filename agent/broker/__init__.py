"""The service broker's pure logic (patent Fig. 10 and Fig. 12; DESIGN.md §8).

No sockets, threads or timers: every module takes an injected clock, and the broker network
role wraps :class:`~agent.broker.broker.Broker` (the CO side wraps
:class:`~agent.broker.renewal.LeaseRenewalManager`).

``leases``      Jini leases: policy clipping, renew, cancel, expire, holder-bound ids
``renewal``     the CO's lease renewal manager
``directory``   service instances: names, addresses, capacity, lifecycle, formats
``admission``   share and CPU held per instance; the move-service seam (AdmissionPolicy)
``credentials`` HMAC service credentials, their verifier and the revocation list
``paths``       dynamic service paths over formats (networkx)
``broker``      the facade
``errors``      typed errors with machine-readable reasons
"""

from agent.broker.admission import Admission, AdmissionPolicy, Decision
from agent.broker.broker import Broker, Grant, HopGrant
from agent.broker.credentials import Claims, RevocationList, ServiceKeys, Verified, Verifier
from agent.broker.directory import Instance, Lifecycle, ServiceDirectory
from agent.broker.errors import (BadRequest, BrokerError, CredentialError, LeaseDenied,
                                 UnknownLease)
from agent.broker.goals import Goal
from agent.broker.leases import ANY, Lease, LeasePolicy, LeaseRequest, LeaseTable
from agent.broker.renewal import LeaseRenewalManager

__all__ = [
    "ANY", "Admission", "AdmissionPolicy", "BadRequest", "Broker", "BrokerError", "Claims",
    "CredentialError", "Decision", "Goal", "Grant", "HopGrant", "Instance", "Lease",
    "LeaseDenied", "LeasePolicy", "LeaseRenewalManager", "LeaseRequest", "LeaseTable",
    "Lifecycle", "RevocationList", "ServiceDirectory", "ServiceKeys", "UnknownLease",
    "Verified", "Verifier",
]
