"""seesaw-mc: throughput-first offline LLM inference (Seesaw, MLSys'25) on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="seesaw-mc",
    version="0.1.0",
    description="Offline LLM inference with dynamic re-sharding (Seesaw) on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["seesaw_mc", "seesaw_mc.*"]),
    # The CPU paged-attention op's source: JIT-built on the host that runs it.
    package_data={"seesaw_mc.model": ["csrc/*.cpp", "csrc/*.h"]},
    # Ranges, not pins: users bring their own (often CUDA) torch. The exact versions
    # tested here live in constraints.txt.
    install_requires=[
        "torch>=2.5",  # SDPA enable_gqa (model/attention.py)
        "megatron-core>=0.16.1,<0.17",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "einops>=0.8",
        "deepspeed>=0.19.8,<0.20",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        # gguf + accelerate: only to convert the bundled SmolLM2 demo model.
        "demo": ["gguf>=0.10", "accelerate>=1.0"],
        "plot": ["matplotlib>=3.8"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["seesaw-mc=seesaw_mc.cli:main"]},
)
