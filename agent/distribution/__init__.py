"""Lease-driven distribution (patent Fig. 12, steps 210-230): when the broker cannot meet a
lease where a service runs, the primary instance's router finds room on another router's VM,
negotiates it, and starts a duplicate of the service there; an instance left without leases
is released. See ``docs/architecture.md`` §4.5. Imports nothing on import."""
