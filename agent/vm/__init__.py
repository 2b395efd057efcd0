"""The router's virtual machines: the VM manager, fetching from the remote site, egress shaping, the logic repository."""
