"""Convert an HF Llama folder (safetensors) into a selm-mcore Megatron checkpoint.

    python tools/convert_hf/hf_to_mcore.py --hf-dir H --out-dir M --tp T --pp P [--dtype auto]

Starts tp*pp local ranks (gloo on CPU, NCCL on GPU) that each read only their slices of the HF
tensors and write one Megatron dist checkpoint (global coordinates: it loads at any layout
whose tp/pp divide the model). Same as ``selm convert hf-to-mcore``; the work is done by
selm_mcore.weights.hf_to_mcore.
"""
import argparse
import logging
import sys

from selm_mcore import weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    weights.add_hf_to_mcore_arguments(parser)
    args = parser.parse_args(argv)
    args.direction = "hf-to-mcore"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return weights.main(args)


if __name__ == "__main__":
    sys.exit(main())
