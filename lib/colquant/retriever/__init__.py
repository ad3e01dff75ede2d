"""ColQwen3, its processor, MaxSim, encoding, checkpoints, FP8 layers, tiny, remote code.

A layer of colquant: its modules import from this layer and the layers below it only
(the layers, lowest first, are listed in colquant/__init__.py).
"""
