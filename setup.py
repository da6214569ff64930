"""Packaging for hf_moe_opt.

The top-level ``patches/`` folder ships as the subpackage ``hf_moe_opt.patches`` so that nothing
named ``patches`` lands in site-packages.
"""

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["hf_moe_opt", "hf_moe_opt.*"]) + ["hf_moe_opt.patches"]

setup(
    name="hf_moe_opt",
    version="0.1.0",
    description="Fast, memory-lean mixture-of-experts inference for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"hf_moe_opt.patches": "patches"},
    include_package_data=True,
    package_data={"hf_moe_opt.assets": ["*/*"], "hf_moe_opt.kernels": ["configs/*.json"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "accelerate>=1.0",
        "safetensors",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": [
            "pytest>=8",
            "pytest-xdist",
            "hypothesis>=6",
            "ruff",
            "nbclient",
            "nbformat",
            "ipykernel",
            "matplotlib",
        ],
        "eval": ["datasets", "evaluate", "sacrebleu", "matplotlib"],
    },
    entry_points={"console_scripts": ["hf-moe-opt=hf_moe_opt.cli:main"]},
)
