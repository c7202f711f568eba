"""One module per seed paper's claim, run by ``benchmarks/reproduce_claims.py <claim>``; shared helpers in ``common``."""
