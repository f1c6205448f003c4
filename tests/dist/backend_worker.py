"""One rank of tests/dist/test_launch.py: which backend and device init_parallel picks here."""

import os

import torch
import torch.distributed as dist
from launch import emit

from selm_mcore.mcore.parallel import destroy_parallel, init_parallel


def main() -> None:
    ctx = init_parallel()
    emit(
        {
            "backend": dist.get_backend(),
            "device": str(ctx.device),
            "cuda_available": torch.cuda.is_available(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    )
    destroy_parallel()


if __name__ == "__main__":
    main()
