"""Mobile objects shipped with MOAT (loaded by ``module:Class`` spec)."""
