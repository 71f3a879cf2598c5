"""What the test tiers share, imported as ``support`` (pyproject's pytest ``pythonpath`` puts tests/ on
the path; the benchmarks that use it add it themselves): the tiny models built by export/convllava/synthetic.py's
checkpoint writer, LLaVA-Mini's writer, the torch references, and the error tests' helpers (cli_runs.py). Never installed
with the package.
"""
