"""Packaging: a wheel built from the checkout holds the compiled ops and the
vLLM plugin entry point, and installed on its own it loads both; the CUDA
compile check cannot pass silently in CI."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINT = "vllm_lookahead = vllm_lookahead.plugin:register"


def source_tree(dest: Path) -> Path:
    """The files a build reads, copied, so that building leaves the
    checkout alone (no build/ or egg-info next to a concurrent editable
    build)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    shutil.copytree(REPO / "csrc", dest / "csrc", ignore=ignore)
    shutil.copytree(REPO / "vllm_lookahead", dest / "vllm_lookahead", ignore=ignore)
    return dest


@pytest.mark.slow
def test_wheel_holds_the_ops_and_the_plugin_and_loads_them(tmp_path):
    (tmp_path / "src").mkdir()
    src = source_tree(tmp_path / "src")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
         "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [wheel] = wheels.glob("vllm_lookahead-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert [n for n in names if n.startswith("vllm_lookahead/_C") and n.endswith(".so")]
        assert "vllm_lookahead/plugin.py" in names
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(info).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "[vllm.general_plugins]" in entry_points and ENTRY_POINT in entry_points
    import torch
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in metadata

    # Installed on its own (its dependency, torch, and vLLM come from this
    # environment): the ops load from the wheel's copy, and vLLM's plugin
    # loader finds and runs its entry point.
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = f"""
import importlib.metadata, torch, vllm_lookahead, vllm_lookahead._C
assert vllm_lookahead.__file__.startswith({str(site)!r}), vllm_lookahead.__file__
eps = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
       if e.value == "vllm_lookahead.plugin:register"]
assert any(str(e.dist.locate_file("")).startswith({str(site)!r}) for e in eps), eps
from vllm.plugins import load_general_plugins
load_general_plugins()
assert hasattr(torch.ops.vllm_lookahead, "ngram_pool_insert"), dir(torch.ops.vllm_lookahead)
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), \
        run.stdout[-3000:] + run.stderr[-3000:]


def test_cuda_compile_check_fails_in_ci_without_nvcc(tmp_path):
    # A PATH with the script's tools but no nvcc.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    script = str(REPO / "scripts" / "check_cuda_compile.sh")
    env = {"PATH": str(bin_dir)}
    ci = subprocess.run([str(bin_dir / "bash"), script], env={**env, "CI": "true"},
                        capture_output=True, text=True)
    assert ci.returncode == 1 and "nvcc not found" in ci.stderr
    local = subprocess.run([str(bin_dir / "bash"), script], env=env,
                           capture_output=True, text=True)
    assert local.returncode == 0 and "skipping" in local.stdout
