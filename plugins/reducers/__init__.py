"""Reducer plugins: token- and step-level compute reduction."""
