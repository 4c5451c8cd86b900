"""Benchmarks: each compares against a baseline in the same process and prints a table."""
