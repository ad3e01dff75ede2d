"""The embedded corpus, mteb retrieval, fidelity, speed and memory sweeps, metrics, plots.

A layer of colquant: its modules import from this layer and the layers below it only
(the layers, lowest first, are listed in colquant/__init__.py).
"""
