"""Ed25519-signed jobs: keys, the signed encoding, the replay window, the worker's gate.

* :mod:`rbit.security.keys` -- key files, fingerprints, the trusted-keys directory.
* :mod:`rbit.security.signing` -- what a signature covers and how it travels.
* :mod:`rbit.security.replay` -- the replay window, kept in SQLite across restarts.
* :mod:`rbit.security.gate` -- the worker's check of every delivery before its runner.
"""
