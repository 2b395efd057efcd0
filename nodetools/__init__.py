"""Tools that run *inside* a node's namespace: ``python -m nodetools.<tool>``.

Both :mod:`topologies` (a running :class:`topologies.moatnet.MoatNetwork`, the run client)
and :mod:`experiments` launch these inside Mininet nodes, so they sit below both layers:
``packets`` ← ``agent`` ← ``nodetools`` ← ``topologies`` ← ``experiments``. A tool here may
import :mod:`packets` and :mod:`agent`, never :mod:`topologies` or :mod:`experiments`
(tests/unit/test_layering.py checks it).

=======================  ===================================================================
``nodetools.probes``     one-shot packet tools (ARP, solicitation, control, service, DNS,
                         fuzzing, registration load); each prints one JSON line
``nodetools.co_load``    a corresponding object under load: numbered service requests at a
                         fixed rate, one JSON line per request
``nodetools.dns``        the DNS client side: an A query and its answer's parser
=======================  ===================================================================
"""
