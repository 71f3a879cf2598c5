"""What the test tiers share, imported as ``support`` (pyproject's pytest ``pythonpath`` puts tests/ on
the path; benchmarks/ and demo/ add it themselves): the synthetic checkpoint writers, the tiny models
built from them, the torch references, and the hardening tests' helpers. Never installed with the package.
"""
