"""The roles every agent is composed of, in start order (stopped in reverse).

This is the one place a new role is registered: write its module (a subclass of
:class:`agent.core.role.Role`) and add it here. Discovery comes first (the others listen to
it), the object agent next (it tells discovery what to advertise); the VM role stops after
hosting, so hosted objects stop without deregistering before their VMs are removed.
"""

from __future__ import annotations

from agent.broker.advertiser import BrokerAdvertiserRole
from agent.broker.instances import ServiceInstancesRole
from agent.broker.role import BrokerRole
from agent.core.role import Role
from agent.distribution.role import DistributionRole
from agent.hosting.migration import MigrationRole
from agent.hosting.objects import HostingRole
from agent.mobility.agent_role import ObjectAgentRole
from agent.mobility.discovery_role import DiscoveryRole
from agent.routing.static_routes import StaticRoutesRole
from agent.vm.role import VmRole

ROLES: tuple[type[Role], ...] = (
    StaticRoutesRole,  # first: the routes the others reach other routers through
    DiscoveryRole,
    ObjectAgentRole,
    VmRole,
    HostingRole,
    MigrationRole,
    ServiceInstancesRole,
    DistributionRole,
    BrokerAdvertiserRole,
    BrokerRole,
)
