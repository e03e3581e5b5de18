"""Not importable on purpose: a runner module that raises while it is imported.

The message is long and spans lines, as a careless module's may be; rbit must quote a
bounded, one-line part of it.
"""

raise RuntimeError("broken at import\n" + "x" * 100_000)
