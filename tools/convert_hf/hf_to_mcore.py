"""Convert an HF folder (safetensors; Llama, Mistral, Qwen2 or Phi-3: docs/models.md) into a
selm-mcore Megatron checkpoint.

    python tools/convert_hf/hf_to_mcore.py --hf-dir H --out-dir M --tp T --pp P [--dtype auto]

Starts tp*pp local ranks (gloo on CPU, NCCL on GPU) that each read only their slices of the HF
tensors and write one Megatron dist checkpoint (global coordinates: it loads at any layout
whose tp/pp divide the model). The same as ``selm convert hf-to-mcore``
(``selm_mcore.mcore.convert``).
"""

import sys

from selm_mcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
