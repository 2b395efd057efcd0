"""The service broker (patent Fig. 10 and Fig. 12; docs/architecture.md).

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
``role``        the broker role (in-band messages), ``advertiser`` the broker advertisements,
``instances``   a router's service instances: registration, LEASE_REVOKE

Import the module you need: this package imports nothing itself, so a sandboxed object that
checks credentials (``credentials``) does not load networkx with ``paths``.
"""
