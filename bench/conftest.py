"""pytest-benchmark suite: ``pytest bench/ --benchmark-only`` (see bench/test_lstm.py)."""
