"""Data preparation the other benchmarks read: the bundled corpus and HaluEval as hybrid rows."""
