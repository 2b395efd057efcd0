"""The daemon's frame: configuration, errors, the event loop that composes roles, control RPC, peer transport, netlink."""
