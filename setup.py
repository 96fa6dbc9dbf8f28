from setuptools import find_packages, setup

with open("requirements.txt") as f:
  requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]
# The accelerator extras pin the same JAX as the CPU requirements.
JAX_VERSION = next(r.split("==")[1] for r in requirements if r.startswith("jax=="))

setup(
    name="dimo_jax",
    version="0.1.0",
    description="Di[M]O in JAX/Flax: distil masked diffusion models into one-step generators",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dimo_jax", "dimo_jax.*", "configs"]),
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=requirements,
    extras_require={
        "torch": ["torch>=2.1"],
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # One accelerator build at the JAX version of requirements.txt: pip install ".[gpu]" / ".[tpu]".
        "gpu": [f"jax[cuda12]=={JAX_VERSION}"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    },
    entry_points={"console_scripts": ["dimo_jax=dimo_jax.main:run"]},
)
