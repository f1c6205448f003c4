"""Export a selm-mcore Megatron checkpoint (saved at any TP/PP) to an HF Llama folder.

    python tools/convert_hf/mcore_to_hf.py --mcore-dir M --out-dir H2 [--max-shard-gb 4]

Writes config.json, model.safetensors (sharded with an index above --max-shard-gb),
generation_config.json and the tokenizer files, vocabulary padding stripped, so transformers
and vLLM load the folder as is. One process by default (--tp/--pp spread a large model over
local ranks). Same as ``selm convert mcore-to-hf``; the work is done by
selm_mcore.weights.mcore_to_hf.
"""
import argparse
import logging
import sys

from selm_mcore import weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    weights.add_mcore_to_hf_arguments(parser)
    args = parser.parse_args(argv)
    args.direction = "mcore-to-hf"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return weights.main(args)


if __name__ == "__main__":
    sys.exit(main())
