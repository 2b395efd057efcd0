"""The router's own routing: keeping the static routes its topology gave it installed.

MOAT runs no routing daemon: each router gets its routes once, from the topology, and the
kernel flushes a route when the link it goes through goes down. :mod:`.static_routes` is the
role that puts them back when the link returns; :mod:`.link_events` tells it when.
"""
