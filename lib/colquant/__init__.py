"""ColQuant: 4-bit ColQwen3 retrievers that still retrieve.

    model, processor = colquant.load("TomoroAI/tomoro-colqwen3-embed-4b")   # or a local directory
    scores = colquant.score(query_embeddings, page_embeddings)             # MaxSim
"""

from colquant import tiny
from colquant.checkpoint import CheckpointError, load
from colquant.model import ColQwen3, ColQwen3Config
from colquant.processing import ColQwen3Processor
from colquant.scoring import score

__all__ = ["CheckpointError", "ColQwen3", "ColQwen3Config", "ColQwen3Processor", "load", "score", "tiny"]
