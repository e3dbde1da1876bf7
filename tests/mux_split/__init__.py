"""A servicer whose multiplexed loader lives in another module (tests/test_multiplex_split.py)."""
