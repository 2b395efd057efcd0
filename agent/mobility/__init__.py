"""Mobile IP for objects: discovery, home and foreign agents, bindings, the registration client, ARP, GRE tunnels."""
