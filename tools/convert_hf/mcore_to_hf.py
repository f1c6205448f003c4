"""Export a selm-mcore Megatron checkpoint (saved at any TP/PP) as an HF folder.

    python tools/convert_hf/mcore_to_hf.py --mcore-dir M --out-dir H [--tp T] [--max-shard-gb 4]
                                           [--overwrite]

Writes config.json, model.safetensors (sharded with an index above --max-shard-gb), the tokenizer
files, generation_config.json and checksums.json: a folder transformers and vLLM load as is.
The export is written next to H and renamed into place; a non-empty H is refused unless
--overwrite. The same as ``selm convert mcore-to-hf`` (``selm_mcore.mcore.convert``).
"""

import sys

from selm_mcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
