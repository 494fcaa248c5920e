"""Install rnp_fast; ``kernels/`` and ``loaders/`` install as ``rnp_fast.kernels`` / ``rnp_fast.loaders``."""

from pathlib import Path

from setuptools import find_packages, setup

packages = find_packages(include=["rnp_fast", "rnp_fast.*"])

setup(
    name="rnp_fast",
    version="0.1.0",
    description="Fast, faithful Reconstructive Neuron Pruning (RNP) backdoor defense",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages + ["rnp_fast.kernels", "rnp_fast.loaders"],
    package_dir={"rnp_fast.kernels": "kernels", "rnp_fast.loaders": "loaders"},
    package_data={"rnp_fast": ["assets/*.safetensors", "assets/*.json"], "rnp_fast.kernels": ["*.json"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "scikit-learn>=1.2",
        "safetensors>=0.4",
        "matplotlib>=3.6",
        "tqdm>=4.60",
        "pillow>=9.1",  # decodes the directory datasets and PNG triggers
        "pyyaml>=6.0",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "ruff>=0.5"],
        "triton": ["triton>=3.0"],  # CI: 3.6.0 (the GPU machine's) and the newest
        "ffcv": ["ffcv>=1.0.2"],  # CI: 1.0.2
        "ray": ["ray[default]>=2.60,<2.61"],  # what CI runs on a real cluster (.ci/run): 2.60.0
    },
    entry_points={"console_scripts": ["rnp-fast=rnp_fast.cli:main"]},
)
