"""tfmeta: meta-learning for TensorFlow and Keras 3. See BUILD.md for why each dependency is pinned as it is."""

from setuptools import find_packages, setup

setup(
    name="tfmeta",
    version="0.1.0",
    description="Meta-learning (MAML, Reptile, ...) for TensorFlow and Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["tfmeta", "tfmeta.*"]),
    package_data={"tfmeta": ["kernels/*.cc"]},  # compiled at first use (tfmeta.kernels)
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-probability[tf]>=0.25,<0.26",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources>=6",
        "gin-config>=0.5,<0.6",
        "absl-py>=2.1,<3",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6"]},
)
