"""Worker of test_packing.py: are two Megatron checkpoint folders' weights bit-identical?

    python tests/dist/compare_checkpoints_worker.py CKPT_A CKPT_B

Emits {"num_tensors": n, "different": [names of tensors that differ]} (one process, TP1).
"""
import sys

import torch
from launch import emit


def main() -> None:
    from selm_mcore.mcore.checkpoint import build_model_from_checkpoint
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel()
    first, _, _ = build_model_from_checkpoint(sys.argv[1], ctx)
    second, _, _ = build_model_from_checkpoint(sys.argv[2], ctx)
    a = {k: v for m in first for k, v in m.state_dict().items() if torch.is_tensor(v)}
    b = {k: v for m in second for k, v in m.state_dict().items() if torch.is_tensor(v)}
    assert a.keys() == b.keys()
    emit({"num_tensors": len(a), "different": sorted(k for k in a if not torch.equal(a[k], b[k]))})
    destroy_parallel()


if __name__ == "__main__":
    main()
