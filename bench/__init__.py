"""Benchmarks of the iMAML trainer (`make bench`, `python -m bench.run [--quick]`); not in the package."""
