"""Making variants: calibration, auto-round W4A16, FP8, GPTQ/AWQ exports, model cards.

A layer of colquant: its modules import from this layer and the layers below it only
(the layers, lowest first, are listed in colquant/__init__.py).
"""
