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
    package_data={"llama": ["demo_data/*", "csrc/*"], "llama.server": ["static/*"]},
    install_requires=get_requirements("requirements.txt"),
    extras_require={
        # openai and httpx: the server's clients in tests; selenium drives Chromium for the chat page
        "test": ["pytest>=7", "transformers>=4.40", "psutil>=5.9", "openai>=1.30", "httpx>=0.27", "selenium>=4.20"],
        "server": ["fastapi>=0.110", "uvicorn>=0.29"],
    },
    entry_points={"console_scripts": ["llama-server=llama.server.cli:main"]},
)
