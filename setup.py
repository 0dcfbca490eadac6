from pathlib import Path

from setuptools import find_packages, setup


def get_requirements(path: str):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.2.0",
    description="Llama 2 inference: text and chat completion on CPU and CUDA, any model-parallel size",
    python_requires=">=3.9",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama": ["demo_data/*"]},
    install_requires=get_requirements("requirements.txt"),
    extras_require={
        "test": ["pytest>=7", "transformers>=4.40", "psutil>=5.9"],
    },
)
