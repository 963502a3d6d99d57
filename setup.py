from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="elleci",
    version="0.1.0",
    description="Post-training research library for Elleci, a hybrid Mamba-2 + MLA + BitNet language model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["elleci", "elleci.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "safetensors", "sentencepiece", "numpy", "einops"],
    extras_require={
        "triton": ["triton"],
        "hf": ["tokenizers"],
        "eval": ["lm_eval>=0.4.13"],       # lm-evaluation-harness: `elleci eval` harness tasks, the "elleci" model
        "dev": ["pytest", "triton", "tokenizers", "lm_eval>=0.4.13", "tensorboard", "wandb"],
    },
    entry_points={"console_scripts": ["elleci = elleci.cli:main"]},
    license="MIT",
)
