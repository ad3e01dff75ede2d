"""Colquant.load (read, then made fast), multi-GPU corpus encoding, the index, compression.

A layer of colquant: its modules import from this layer and the layers below it only
(the layers, lowest first, are listed in colquant/__init__.py).
"""
