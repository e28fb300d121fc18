"""megallama: LLaMA-family training on Megatron-style tensor parallelism, driven by DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="megallama",
    version="0.1.0",
    description="Train LLaMA-family models at scale: TP layers, DeepSpeed ZeRO/pipeline, planners.",
    python_requires=">=3.9",
    packages=find_packages(include=["megallama", "megallama.*"]),
    package_data={"megallama": ["configs/*.yaml", "configs/**/*.yaml"]},
    include_package_data=True,
    # torch is pinned by the Makefile for CPU machines (an unpinned torch pulls a CUDA build).
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "sentencepiece>=0.1.99",
        "tokenizers>=0.19",  # tokenizer.json and tiktoken-format (Llama 3) tokenizer files
        "pyyaml>=6",
        "pydantic>=2",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1", "mpich"],
        "test": [
            "pytest>=7",
            "pytest-timeout",
            "hypothesis>=6",
            "transformers>=4.40",
            "tiktoken>=0.6",  # the tiktoken-format tokenizer is checked against tiktoken itself
            "safetensors>=0.4",
            "megatron-core>=0.8",
            "wandb>=0.19",  # the wandb tracker's test (offline, no network)
            "datasets>=2.14",  # preprocess from save_to_disk directories, parquet and arrow (brings pyarrow)
            "zstandard>=0.21",  # preprocess from .jsonl.zst
        ],
        "tools": ["matplotlib>=3.7", "tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["megallama=megallama.cli:run"]},
)
