"""ColQuant: 4-bit ColQwen3 retrievers that still retrieve."""
