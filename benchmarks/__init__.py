"""quickflow's performance suite: ``python -m benchmarks.run`` (see ``benchmarks/README.md``).

Nothing here is imported by the product; the test suite never asserts on timings.
"""
