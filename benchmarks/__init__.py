"""Side-by-side benchmark of this template's objectives against TRL (issue 11).

Run from the repository root: ``python benchmarks/run.py`` (see ``benchmarks/config.yaml``).
"""
