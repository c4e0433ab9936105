"""minilora: a minimal, readable, trustworthy LoRA / QLoRA toolkit.

The cffi extension ``minilora._native`` is built at install time from ``csrc/`` (``cffi_modules``).
The click commands live in the top-level ``cli/`` folder and are installed as ``minilora.cli`` so that
no generic module named ``cli`` lands in site-packages.
"""
from setuptools import setup

TORCH = "torch==2.13.0"  # the CPU build on disk; a bare "torch" may pull a multi-GB CUDA build

setup(
    name="minilora",
    version="0.1.0",
    description="A minimal, readable, trustworthy LoRA / QLoRA toolkit: NumPy reference, C kernels, CLI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["minilora", "minilora.cli", "minilora.torch_backend"],
    package_dir={"minilora": "minilora", "minilora.cli": "cli"},
    package_data={"minilora": ["data/*"]},
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/build_native.py:ffibuilder"],
    install_requires=[
        "numpy>=1.24",
        "cffi>=1.15",
        "click>=8.1",
        "ml_dtypes>=0.3",   # bfloat16 arrays in NumPy with exact round-to-nearest-even casts
    ],
    extras_require={
        # tokenizers reads tokenizer.json; jinja2 renders chat templates (torch already needs it)
        "torch": [TORCH, "tokenizers>=0.15", "jinja2"],
        # peft + transformers (pinned to the versions the vectors were checked against) let the tests prove
        # that PeftModel.from_pretrained loads the adapters minilora writes; never a runtime dependency.
        "test": ["pytest>=7", "hypothesis>=6.80", TORCH, "safetensors>=0.4", "tokenizers>=0.15", "jinja2",
                 "peft==0.21.2", "transformers==5.23.0"],
    },
    entry_points={"console_scripts": ["minilora=minilora.cli.main:main"]},
    zip_safe=False,
)
