"""Read a Megatron checkpoint's model tensors with torch's own DCP reader (no Megatron import,
no process), independently of selm_mcore's loaders.

Importable as ``checkpoints`` from tests (tests/conftest.py)::

    state = checkpoint_tensors(run / "final", tmp_path / "final.pt")   # {name: tensor}
"""

from pathlib import Path

import torch


def checkpoint_tensors(ckpt_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a Megatron checkpoint folder (its ``model/`` DCP checkpoint);
    ``scratch`` is the torch.save file the DCP reader converts it to."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(Path(ckpt_dir) / "model"), str(scratch))
    state = torch.load(scratch, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
