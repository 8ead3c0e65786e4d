"""Inputs: calibration and evaluation text (text.py), image folders (images.py), and the real
weights and books that ship inside registry packages (assets.py)."""
