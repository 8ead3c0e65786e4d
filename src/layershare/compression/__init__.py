"""Compression: plan a recipe's budget, drive a method over the model's groups, tune, check.

Nothing here is imported by loading a compressed model (see checkpoint/ and runtime/)."""
