from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

install_requires = [
    "torch>=2.5,<3",
    "diffusers>=0.36,<0.50",
    "transformers>=5.0,<6",
    "accelerate>=1.10,<2",
    "datasets>=4.0,<6",
    "huggingface-hub>=1.0,<3",
    "safetensors>=0.5,<1",
    "tokenizers>=0.21",  # the RQ authors' text tokenizer (CharBPE), wrapped as a transformers tokenizer
    "numpy>=1.26",
    "pillow>=10",
    "tqdm>=4.66",
    "pyyaml>=6",
]

extras = {
    "train": ["tensorboard>=2.16"],
    # Optional: ZeRO-2/3 through Accelerate (training/accelerate_configs/deepspeed_zero*.yaml); builds its ops on use.
    "deepspeed": ["deepspeed>=0.15"],
    "test": ["pytest>=8", "scipy>=1.11", "scikit-learn>=1.4", "scikit-image>=0.22", "tensorboard>=2.16"],
}
extras["dev"] = sorted(set(extras["train"] + extras["test"] + ["ruff"]))

setup(
    name="hf-rq",
    version="0.1.0.dev0",
    description="Autoregressive image generation over quantized tokens (RQ, DQ, CTF) for the Hugging Face ecosystem",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={"hf_rq": ["bundled/**/*", "bundled/*"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["hf-rq=hf_rq.cli:main"]},
)
