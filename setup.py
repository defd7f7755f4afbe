"""Build vllm-lookahead: the Python package plus the compiled ops in csrc/.

The CUDA sources are compiled when the installed torch is a CUDA build and a
CUDA toolkit is present; otherwise only the CPU ops are built.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/bindings.cpp", f"{CSRC}/ngram_pool_cpu.cpp", f"{CSRC}/tree_cpu.cpp",
               f"{CSRC}/lookahead_tree_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/ngram_pool_cuda.cu", f"{CSRC}/tree_cuda.cu"]


def build_with_cuda() -> bool:
    import torch

    forced = os.environ.get("VLLM_LOOKAHEAD_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    cxx_flags = ["-O3", "-std=c++20"]
    if build_with_cuda():
        return cpp_extension.CUDAExtension(
            "vllm_lookahead._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
        )
    return cpp_extension.CppExtension(
        "vllm_lookahead._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}
    )


setup(
    name="vllm-lookahead",
    version="0.1.0",
    description="Lossless lookahead and staged speculative decoding for vLLM",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_lookahead", "vllm_lookahead.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={
        "vllm.general_plugins": ["vllm_lookahead = vllm_lookahead.plugin:register"]
    },
)
