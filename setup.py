"""simclr_jax: a TPU-first JAX/Flax training system for SimCLR (v1 and v2)."""

import setuptools

# TensorFlow only feeds the tf.data input pipeline; the CPU build avoids it grabbing
# accelerators (and CUDA libraries) that JAX owns.
TENSORFLOW = [
    "tensorflow-cpu>=2.16; sys_platform == 'linux' and platform_machine == 'x86_64'",
    "tensorflow>=2.16; sys_platform != 'linux' or platform_machine != 'x86_64'",
]

setuptools.setup(
    name="simclr_jax",
    version="0.1.0",
    description="SimCLR v1/v2 contrastive pretraining in JAX/Flax for TPU pods and CPUs.",
    packages=setuptools.find_packages(include=["simclr_jax", "simclr_jax.*"]),
    package_data={"simclr_jax": ["data/bundled/*"]},
    python_requires=">=3.11",  # jax >= 0.7 and flax 0.12 need 3.11
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "clu>=0.0.10",
        "tensorboard>=2.16",
        "tensorflow-datasets>=4.9.4",
        # `tfds build` / download_and_prepare (ImageNet from the manual tars) imports it.
        "importlib_resources>=6",
        # The TF-free input path (data.backend='jax'); 0.2.18 is the release tested here.
        "grain==0.2.18",
        "numpy>=1.26",
        "pillow>=10",
        "absl-py>=1.4",
        # `python -m simclr_jax.export` writes PyTorch weights from NumPy arrays, without torch.
        "safetensors>=0.4",
        *TENSORFLOW,
    ],
    extras_require={
        # `python -m simclr_jax.visualize curves` draws with matplotlib.
        "plots": ["matplotlib>=3.8"],
        # Loading an export (python -m simclr_jax.export) in PyTorch; tests/test_export.py.
        "torch": ["torch>=2.4", "torchvision>=0.19"],
        # benchmarks/compare_peers.py: the PyTorch / lightly side of the comparison.
        "peers": ["torch>=2.4", "torchvision>=0.19", "lightly>=1.5"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",  # a hung test fails with every thread's stack, not CI's limit
            "ruff>=0.5",
            "matplotlib>=3.8",
            "scipy>=1.10",  # KS test of the crop statistics
            "psutil>=5",  # finds Grain worker processes in tests and benchmarks
            "jsonschema>=4.18",  # rendered GKE JobSets against the JobSet CRD's schema
            # The TPU compiler: tests/test_preflight.py compiles steps for TPU slices on CPU.
            "libtpu==0.0.42.1; sys_platform == 'linux' and platform_machine == 'x86_64'",
        ],
        "tpu": ["jax[tpu]>=0.6"],
    },
)
