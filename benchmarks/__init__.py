"""The benchmarks, by kind (benchmarks/README.md maps each script to its docs page and result file).

Run them as modules from the checkout's root: `python -m benchmarks.performance.speed --help`.
"""
