"""Benchmarks: `python -m bench NAME`. Each prints a table and ends with one ratio line."""
