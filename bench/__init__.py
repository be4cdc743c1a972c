"""Benchmarks (not installed): the emulated-room harness, link and runtime benchmarks."""
