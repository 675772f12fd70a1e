"""Tokenizer plugins: the grid <-> token ends of a model."""
