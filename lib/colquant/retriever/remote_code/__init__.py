"""Make every ColQuant checkpoint loadable by `transformers.AutoModel`/`AutoProcessor` alone.

Checkpoints carry the project's own code next to the weights, with an `auto_map` in config.json:
`modeling_colqwen3.py` is `colquant/retriever/model.py` itself (it imports only torch and transformers),
`weight_checks.py` is `colquant/retriever/weight_checks.py` (the checks `ColQwen3.from_pretrained` runs on the
weights, so a damaged checkpoint is refused here as by `colquant.load`),
`colquant_processing.py` is `colquant/retriever/processing.py` (torch, PIL, transformers), and
`processing_colqwen3.py` adds the hub processor interface mteb's ColQwen3 wrapper calls
(`processor(images=..., text=...)`, `score_multi_vector`). Copying the very files colquant runs
means `AutoModel.from_pretrained(dir, trust_remote_code=True)` computes exactly what
`colquant.load(dir)` does; 4-bit layers are restored by transformers' auto-round integration from
the `quantization_config` the checkpoint already holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from colquant.basics.files import write_text

PACKAGE = Path(__file__).resolve().parent.parent  # the package holding this one: model.py, processing.py beside it
REMOTE_CODE_FILES = {
    "modeling_colqwen3.py": PACKAGE / "model.py",
    "weight_checks.py": PACKAGE / "weight_checks.py",  # model.py imports it by this name (relative import)
    "colquant_processing.py": PACKAGE / "processing.py",
    "processing_colqwen3.py": Path(__file__).parent / "processing_colqwen3.py",
}
AUTO_MAP = {
    "AutoConfig": "modeling_colqwen3.ColQwen3Config",
    "AutoModel": "modeling_colqwen3.ColQwen3",
    "AutoProcessor": "processing_colqwen3.ColQwen3Processor",
}


def write_remote_code(checkpoint: str | Path) -> Path:
    """Copy the code files into `checkpoint` and add `auto_map` to its config.json (atomically)."""
    checkpoint = Path(checkpoint)
    config_file = checkpoint / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{checkpoint} has no config.json: write the model before its remote code")
    for name, source in REMOTE_CODE_FILES.items():
        shutil.copyfile(source, checkpoint / name)
    config = json.loads(config_file.read_text())
    config["auto_map"] = AUTO_MAP
    write_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return checkpoint
