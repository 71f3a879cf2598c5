"""What the test tiers share, imported as ``support`` (pyproject's pytest ``pythonpath`` puts tests/ on
the path; the benchmarks that use it add it themselves): the tiny models built by export/synthetic.py's
checkpoint writer, LLaVA-Mini's writer, the torch references, and the hardening tests' helpers. Never installed
with the package.
"""
