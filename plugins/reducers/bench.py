"""Reducer benchmarks, registered as `dyncompute bench` cases (filled in below)."""
