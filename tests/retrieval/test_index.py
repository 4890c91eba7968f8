import json
import re
import subprocess
import sys

import faiss
import numpy as np
import pytest

from core.errors import InputError
from retrieval.index import IndexConfig, build_index, build_lock, make_faiss_index
from retrieval.index_snapshot import read_manifest
from retrieval.retriever import Retriever
from tests.conftest import ROOT, write_doc


def test_flat_topk_equals_numpy_argsort():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(500, 24)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = vecs[:10] + 0.1 * rng.normal(size=(10, 24)).astype(np.float32)
    index, params = make_faiss_index(vecs, IndexConfig(index_type="flat"))
    assert params["type"] == "flat"
    scores, rows = index.search(queries, 7)
    expect = np.argsort(-(queries @ vecs.T), axis=1)[:, :7]
    assert (rows == expect).all()
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vecs.T, expect, 1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_indexes_recall_on_clustered_vectors(kind):
    # Approximate indexes are meant for clustered data (real embeddings), not uniform noise.
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(50, 32))
    vecs = (centers[rng.integers(0, 50, 5000)] + 0.3 * rng.normal(size=(5000, 32))).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = vecs[:100]
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    index, params = make_faiss_index(vecs, IndexConfig(index_type=kind))
    assert params["type"] == kind
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    else:
        index.nprobe = params["nprobe"]
    _, rows = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall >= 0.9


def _clustered(n=5000, dim=32, seed=1):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, dim))
    vecs = (centers[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def test_ivfpq_recall_against_flat_on_clustered_vectors():
    # Small and 6-bit so it trains in about a second; measured recall 0.90 (0.97 at 8 bits).
    vecs = _clustered(n=2000)
    queries = vecs[:100]
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    index, params = make_faiss_index(vecs, IndexConfig(index_type="ivfpq", ivf_nprobe=16, ivfpq_m=32, ivfpq_nbits=6))
    # nlist: 4 x sqrt(2000) = 178, capped at 2000 / 39 = 51 like ivf.
    assert params == {"type": "ivfpq", "nlist": 51, "nprobe": 16, "m": 32, "nbits": 6}
    assert isinstance(index, faiss.IndexIVFPQ) and index.code_size == 24  # m * nbits / 8 bytes a vector
    assert index.nprobe == 16  # stored in the index itself
    scores, rows = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall >= 0.85
    # Scores are approximate inner products (higher = better, as fusion expects), not L2 distances.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vecs[rows]), atol=0.06)


def test_ivfpq_default_m_is_a_divisor_of_dim_near_dim_over_8():
    from retrieval.ann import default_pq_m

    assert (default_pq_m(384), default_pq_m(768), default_pq_m(32), default_pq_m(100), default_pq_m(7)) == (48, 96, 4, 10, 1)
    assert make_faiss_index(_clustered(n=1000), IndexConfig(index_type="ivfpq"))[1]["m"] == 4


@pytest.mark.parametrize("cfg,pattern", [
    (IndexConfig(index_type="ivfpq", ivfpq_m=5), "--ivfpq-m 5 does not divide the embedder's dimension 32"),
    (IndexConfig(index_type="ivfpq", ivfpq_nbits=12), r"1000 chunks are too few to train --ivfpq-nbits 12 .*4096"),
])
def test_ivfpq_parameters_these_vectors_cannot_train_are_one_clear_error(cfg, pattern):
    with pytest.raises(InputError, match=pattern):
        make_faiss_index(_clustered(n=1000), cfg)


def test_ivfpq_index_builds_saves_reloads_and_reindexes(small_corpus, tmp_path, tiny_embedder):
    cfg = IndexConfig(chunk_tokens=64, overlap=8, index_type="ivfpq", ivfpq_nbits=4)
    out = tmp_path / "pq"
    rep = build_index(small_corpus, out, cfg, embedder=tiny_embedder)
    assert rep.index_type == "ivfpq"
    m = read_manifest(out)
    assert m["index"] == {"type": "ivfpq", "nlist": 1, "nprobe": 32, "m": 4, "nbits": 4}  # nlist: few chunks
    assert m["config"]["index_type"] == "ivfpq" and m["config"]["ivfpq_nbits"] == 4
    assert isinstance(faiss.read_index(str(out / "index.faiss")), faiss.IndexIVFPQ)
    r = Retriever.load(out, embedder=tiny_embedder)
    assert len(r) == rep.chunks
    # Searched through the IVF parameters, the group filter inside FAISS included.
    public = r.search("salary band", k=len(r), mode="dense")
    assert public and not any("SECRET" in h.text for h in public)
    assert any("SECRET-HR" in h.text for h in r.search("salary band", k=len(r), groups=["hr"], mode="dense"))
    # Re-indexing: unchanged documents' vectors reused, the quantizers re-trained, deletions gone.
    (small_corpus / "support.txt").unlink()
    write_doc(small_corpus, "office.md", "Office guide", "The office now opens at 9 am.")
    again = build_index(small_corpus, out, cfg, embedder=tiny_embedder)
    assert (again.embedded_documents, again.reused_documents, again.deleted_documents) == (1, 4, 1)
    r = Retriever.load(out, embedder=tiny_embedder)
    assert read_manifest(out)["index"]["type"] == "ivfpq"
    assert "support" not in {h.doc_id for h in r.search("support extension", k=len(r), mode="dense")}


def test_ivfpq_that_cannot_train_fails_before_embedding(small_corpus, small_index, tiny_embedder, monkeypatch):
    before = Retriever.load(small_index, embedder=tiny_embedder).search("battery", k=3)
    monkeypatch.setattr(tiny_embedder, "encode", lambda *a, **k: pytest.fail("embedded before the check"))
    for cfg, pattern in [(IndexConfig(chunk_tokens=64, overlap=8, index_type="ivfpq", ivfpq_m=5), "--ivfpq-m 5"),
                         (IndexConfig(chunk_tokens=64, overlap=8, index_type="ivfpq"), "too few to train --ivfpq-nbits 8")]:
        with pytest.raises(InputError, match=pattern):
            build_index(small_corpus, small_index, cfg, embedder=tiny_embedder)
    monkeypatch.undo()
    assert Retriever.load(small_index, embedder=tiny_embedder).search("battery", k=3) == before


def test_auto_picks_hnsw_above_threshold():
    vecs = np.eye(16, dtype=np.float32)
    assert make_faiss_index(vecs, IndexConfig(index_type="auto", ann_threshold=10))[1]["type"] == "hnsw"
    assert make_faiss_index(vecs, IndexConfig(index_type="auto", ann_threshold=100))[1]["type"] == "flat"


def test_manifest_records_embedder_chunking_counts_checksums(small_index, tiny_embedder):
    m = read_manifest(small_index)
    assert m["embedder"]["fingerprint"] == tiny_embedder.fingerprint
    assert m["embedder"]["dim"] == 32 and m["embedder"]["normalize"] is True
    assert m["chunking"]["chunk_tokens"] == 64 and m["chunking"]["overlap"] == 8
    assert m["counts"]["documents"] == 6 and m["counts"]["restricted_documents"] == 2
    assert set(m["files"]) == {"index.faiss", "chunks.sqlite"}


def test_retriever_scores_match_numpy_on_stored_vectors(small_index, tiny_embedder):
    r = Retriever.load(small_index, embedder=tiny_embedder)
    vecs = r.vectors()
    q = tiny_embedder.encode(["battery life"])
    hits = r.search_vectors(q, k=len(r), groups=["hr", "finance"])[0]
    scores = vecs @ q[0]
    assert [h.score for h in hits] == pytest.approx(sorted(scores, reverse=True), rel=1e-5)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_index_is_refused(small_index, tiny_embedder, damage):
    path = small_index / "index.faiss"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch"):
        Retriever.load(small_index, embedder=tiny_embedder)


def test_other_embedder_is_refused(small_index, tmp_path, tiny_embedder_dir):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_embedder_dir, other)
    weights = next(other.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(InputError, match="fingerprint .* differs"):
        Retriever.load(small_index, embedder=str(other))


def test_reindex_embeds_only_new_or_changed_and_drops_deleted(small_corpus, small_index, tiny_embedder):
    cfg = IndexConfig(chunk_tokens=64, overlap=8)
    again = build_index(small_corpus, small_index, cfg, embedder=tiny_embedder)
    assert (again.embedded_documents, again.reused_documents, again.deleted_documents) == (0, 6, 0)
    write_doc(small_corpus, "office.md", "Office guide", "The office now opens at 9 am.")
    (small_corpus / "support.txt").unlink()
    write_doc(small_corpus, "new.md", "New", "A brand new page about anchors.")
    rep = build_index(small_corpus, small_index, cfg, embedder=tiny_embedder)
    assert (rep.embedded_documents, rep.reused_documents, rep.deleted_documents) == (2, 4, 1)
    r = Retriever.load(small_index, embedder=tiny_embedder)
    docs = {h.doc_id for h in r.chunks(include_restricted=True)}
    assert "support" not in docs and "new" in docs
    assert "9 am" in r.chunks("office")[0].text
    # Reused vectors are identical to freshly computed ones.
    fresh = tiny_embedder.encode([f"{h.title}\n{h.text}" for h in r.chunks(include_restricted=True)])
    np.testing.assert_allclose(r.vectors(), fresh, atol=1e-5)
    # Changing chunking re-embeds everything.
    rep = build_index(small_corpus, small_index, IndexConfig(chunk_tokens=32, overlap=0), embedder=tiny_embedder)
    assert rep.reused_documents == 0


def test_interrupted_build_leaves_previous_index_intact(small_corpus, small_index, tiny_embedder, monkeypatch):
    import retrieval.index as index_mod

    before = Retriever.load(small_index, embedder=tiny_embedder).search("battery", k=3)
    write_doc(small_corpus, "office.md", "Office guide", "Changed text.")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_mod, "make_faiss_index", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index(small_corpus, small_index, IndexConfig(chunk_tokens=64, overlap=8), embedder=tiny_embedder)
    assert Retriever.load(small_index, embedder=tiny_embedder).search("battery", k=3) == before
    assert not [p for p in small_index.parent.iterdir() if ".tmp-" in p.name]


def test_killed_build_process_leaves_previous_index_intact(small_corpus, small_index, tiny_embedder_dir, tiny_embedder):
    before = Retriever.load(small_index, embedder=tiny_embedder).search("battery", k=3)
    write_doc(small_corpus, "office.md", "Office guide", "Changed text.")
    # A child process that SIGKILLs itself halfway through the build (after embedding, before the swap).
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import retrieval.index as m
from retrieval.embedder import load_embedder
m.make_faiss_index = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
m.build_index({str(small_corpus)!r}, {str(small_index)!r}, m.IndexConfig(chunk_tokens=64, overlap=8),
              embedder=load_embedder({str(tiny_embedder_dir)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert Retriever.load(small_index, embedder=tiny_embedder).search("battery", k=3) == before
    leftovers = [p for p in small_index.parent.iterdir() if p.name.startswith(".index.tmp-")]
    assert leftovers  # what SIGKILL leaves behind...
    # The next build succeeds despite the dead one's leftovers, removes them and picks up the change.
    build_index(small_corpus, small_index, IndexConfig(chunk_tokens=64, overlap=8), embedder=tiny_embedder)
    assert "Changed" in Retriever.load(small_index, embedder=tiny_embedder).chunks("office")[0].text
    assert not any(p.exists() for p in leftovers)


def test_concurrent_build_is_locked_out(small_corpus, small_index, tiny_embedder):
    with build_lock(small_index):
        with pytest.raises(InputError, match="another build is writing"):
            build_index(small_corpus, small_index, IndexConfig(chunk_tokens=64, overlap=8), embedder=tiny_embedder)


def test_refuses_to_overwrite_a_non_index_directory(small_corpus, tmp_path, tiny_embedder):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.txt").write_text("do not delete")
    with pytest.raises(InputError, match="not a hybrid index"):
        build_index(small_corpus, target, IndexConfig(), embedder=tiny_embedder)
    assert (target / "thesis.txt").exists()


def test_bad_config_lists_every_problem():
    problems = IndexConfig(chunk_tokens=4, overlap=-1, index_type="tree", ivfpq_m=-1, ivfpq_nbits=0).problems()
    assert any("--chunk-tokens" in p for p in problems)
    assert any("--overlap" in p for p in problems)
    assert any("--index-type" in p and "ivfpq" in p for p in problems)
    assert any("--ivfpq-m must be >= 0" in p for p in problems)
    assert any("--ivfpq-nbits must be between 1 and 16" in p for p in problems)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_build_removes_stale_stages_of_dead_builds_only(small_corpus, small_index, tiny_embedder):
    import os

    dead, parent = _dead_pid(), small_index.parent
    stale = [parent / f".index.tmp-{dead}-abc", parent / f".index.tmp-{dead}", parent / f".index.old-{dead}-x"]
    live = parent / f".index.tmp-{os.getpid()}-busy"  # a running writer's stage (this process)
    other = parent / f".other.tmp-{dead}-abc"  # another artifact's: not ours to judge
    for d in stale + [live, other]:
        d.mkdir()
        (d / "index.faiss").write_bytes(b"half")
    build_index(small_corpus, small_index, IndexConfig(chunk_tokens=64, overlap=8), embedder=tiny_embedder)
    assert not any(d.exists() for d in stale)
    assert live.exists() and other.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(".index.") and p.is_dir()] == [live.name]


# --- the manifest is a schema, checked before anything it names is read ---------------------------

def _set(m, path, value):
    *head, last = path.split(".")
    for k in head:
        m = m[k]
    if value is KeyError:
        del m[last]
    else:
        m[last] = value


@pytest.mark.parametrize("path,value,pattern", [
    ("files", {}, "'files' must list exactly index.faiss and chunks.sqlite"),
    ("files.chunks.sqlite", KeyError, "'files' must list exactly"),
    ("files", {"index.faiss": "0" * 64, "chunks.sqlite": "0" * 64, "../../etc/hostname": "0" * 64}, "'files' must list exactly"),
    ("files", KeyError, "field 'files' is missing"),
    ("files", [], "field 'files' is missing or not an object"),
    ("files.index.faiss", 5, "sha256 hex digests"),
    ("embedder", KeyError, "field 'embedder' is missing"),
    ("embedder.dim", "32", "'embedder.dim' must be a positive integer"),
    ("embedder.dim", True, "'embedder.dim' must be a positive integer"),
    ("embedder.fingerprint", None, "'embedder.fingerprint'"),
    ("embedder.normalize", False, "'embedder.normalize' must be true"),
    ("index.type", "tree", "'index.type'"),
    ("index", {"type": "hnsw"}, "'index.m'"),
    ("index", {"type": "ivf", "nlist": 4}, "'index.nlist'/'nprobe'"),
    ("index", {"type": "ivfpq", "nlist": 4, "nprobe": 8}, "'index.m'/'nbits'"),
    ("index", {"type": "ivfpq", "m": 4, "nbits": 8}, "'index.nlist'/'nprobe'"),
    ("counts.chunks", -1, "'counts'"),
    ("chunking", None, "field 'chunking'"),
    ("format_version", True, "index format True is not 1"),
    ("format_version", 2, "index format 2 is not 1"),
    ("corpus", 3, "field 'corpus'"),
])
def test_invalid_manifest_is_refused_before_any_file_is_read(small_index, tiny_embedder, path, value, pattern):
    mpath = small_index / "manifest.json"
    m = json.loads(mpath.read_text())
    if path.startswith("files."):  # file names contain a dot
        name = path.removeprefix("files.")
        m["files"].pop(name) if value is KeyError else m["files"].__setitem__(name, value)
    else:
        _set(m, path, value)
    mpath.write_text(json.dumps(m))
    (small_index / "chunks.sqlite").write_bytes(b"not a database")  # would be opened if the check were skipped
    for load in (lambda: read_manifest(small_index), lambda: read_manifest(small_index, verify=False),
                 lambda: Retriever.load(small_index, embedder=tiny_embedder)):
        with pytest.raises(InputError, match=f"manifest.json: .*{re.escape(pattern)}" if "format" not in pattern
                           else re.escape(pattern)):
            load()


@pytest.mark.parametrize("text", ["[]", '"manifest"', "null", "3", "{", "\u00ff", "[" * 100_000, "1" * 5000, "{}"])
def test_manifest_that_is_not_an_object_is_an_input_error(small_index, tiny_embedder, text):
    (small_index / "manifest.json").write_text(text)
    with pytest.raises(InputError, match="manifest"):
        read_manifest(small_index)
    with pytest.raises(InputError, match="manifest"):
        Retriever.load(small_index, embedder=tiny_embedder)


def test_files_that_disagree_with_the_manifest_are_refused(small_index, tiny_embedder):
    # Consistent checksums but a manifest claiming other counts: refused, not half-trusted.
    mpath = small_index / "manifest.json"
    m = json.loads(mpath.read_text())
    m["counts"]["chunks"] += 1
    mpath.write_text(json.dumps(m))
    with pytest.raises(InputError, match="disagree on the chunks"):
        Retriever.load(small_index, embedder=tiny_embedder)


def test_chunk_store_that_is_not_sqlite_is_an_input_error(small_index, tiny_embedder):
    from core.atomic import sha256_file

    store = small_index / "chunks.sqlite"
    store.write_bytes(b"garbage" * 100)
    mpath = small_index / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"]["chunks.sqlite"] = sha256_file(store)  # checksum matches the garbage
    mpath.write_text(json.dumps(m))
    with pytest.raises(InputError, match="chunks.sqlite: cannot be opened as a hybrid chunk store"):
        Retriever.load(small_index, embedder=tiny_embedder)
