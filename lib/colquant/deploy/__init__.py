"""Hub pushes, the vLLM serving check, the benchmark.

A layer of colquant: its modules import from this layer and the layers below it only
(the layers, lowest first, are listed in colquant/__init__.py).
"""
