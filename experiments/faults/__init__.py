"""``moat run faults``: inject each fault of issue 13 while a CO sends 200 requests/s to the
counter away from home, and measure from the outside whether and how fast service comes back
with the counter's state exact.

* :mod:`.catalog`  the faults (pure data: what each does, what mechanism must recover it)
* :mod:`.timeline` the pure analysis of the CO's per-request log: loss, recovery time, state
* :mod:`.report`   a row per fault, summary.json, rows.csv, the printed table, the plot
* :mod:`.injector` how each fault is made in a running network (kill -9, link down/up, ...)
* :mod:`.driver`   the network, the load, the faults in order, the results
"""
