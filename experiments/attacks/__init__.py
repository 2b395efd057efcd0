"""``moat run attacks``: an attack suite run from an attacker host inside a live PatentTopo.

Modules, each named for what it holds:

* :mod:`.catalog` — the attack classes: what each sends, the refusal it expects, the defence
  it tests (pure data).
* :mod:`.report` — a row per class, the summary (summary.json) and the printed table (pure).
* :mod:`.state` — the targeted state before and after (bindings, visitors, objects, leases,
  VMs, agents heard) and an agent's memory, from the run's control sockets.
* :mod:`.secrets` — every key of a run, and a search of captures for them.
* :mod:`.wire` — the messages the attacks send, built from captured or crafted bytes.
* :mod:`.classes` — one function per attack class: send from the attacker, observe, a row.
* :mod:`.driver` — the network, the captures, the order of the classes, the result directory.

The attacker's own tools run inside its node: :mod:`nodetools.attacker`.
"""
