import os
import shutil
import threading
import time

import pytest

from core import atomic
from core.atomic import remove_stale_stages, staged_dir, swap_dir_into_place
from core.errors import InputError
from retrieval.index import IndexConfig, build_index
from retrieval.index_snapshot import read_manifest
from retrieval.retriever import Retriever
from tests.conftest import make_small_corpus, write_doc


@pytest.fixture(params=["exchange", "two_renames"])
def swap_mode(request, monkeypatch):
    if request.param == "two_renames":  # kernels/filesystems without RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def test_swap_replaces_the_directory_and_removes_the_old_one(tmp_path, swap_mode):
    dest, new = tmp_path / "dest", tmp_path / "new"
    dest.mkdir()
    (dest / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    swap_dir_into_place(new, dest)
    assert (dest / "f").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    new.mkdir()
    swap_dir_into_place(new, tmp_path / "fresh")  # nothing there yet
    assert (tmp_path / "fresh").is_dir() and not new.exists()


def test_exchange_is_used_where_the_kernel_has_it(tmp_path, monkeypatch):
    calls = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    dest, new = tmp_path / "dest", tmp_path / "new"
    dest.mkdir()
    new.mkdir()
    (new / "f").write_text("new")
    swap_dir_into_place(new, dest)
    assert calls and (dest / "f").read_text() == "new"
    if real(tmp_path / "dest", tmp_path / "dest"):  # Linux with renameat2: one atomic step, no .old- name
        assert not any(".old-" in p.name for p in tmp_path.iterdir())


def test_dest_never_missing_during_exchange_swaps(tmp_path):
    dest = tmp_path / "dest"
    with staged_dir(dest) as stage:
        (stage / "v").write_text("0")
    if not atomic._exchange(dest, dest):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    stop, missing = threading.Event(), []

    def watch():
        while not stop.is_set():
            if not os.path.isdir(dest):
                missing.append(time.monotonic())

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(200):
            with staged_dir(dest) as stage:
                (stage / "v").write_text(str(i))
    finally:
        stop.set()
        t.join()
    assert not missing and (dest / "v").read_text() == "199"


def test_remove_stale_stages_keeps_live_writers(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dest = tmp_path / "m"
    dead = [tmp_path / f".m.tmp-{proc.pid}-x", tmp_path / f".m.old-{proc.pid}"]
    live = tmp_path / f".m.tmp-{os.getpid()}-y"
    for d in dead + [live]:
        d.mkdir()
    assert sorted(remove_stale_stages(dest)) == sorted(dead)
    assert live.exists()


# --- a reader opening the index while builds replace it sees one whole index ------------------------

QUERIES = ["battery", "salary band", "office hours"]


def _answers(index_dir, embedder):
    r = Retriever.load(index_dir, embedder=embedder)
    assert len(r) == r.manifest["counts"]["chunks"]
    return r.manifest["created_at"], tuple(
        tuple((h.chunk_id, h.text, round(h.score, 4)) for h in r.search(q, k=4, groups=["hr"])) for q in QUERIES)


def _read_while(target, embedder, writer, reads=0):
    """Load and search `target` here while `writer(stop)` runs in a thread: until the writer is done,
    and at least `reads` times (then `stop` is set for a writer that loops). Returns what was seen."""
    seen, errors, stop = [], [], threading.Event()

    def write():
        try:
            writer(stop)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=write)
    t.start()
    try:
        while t.is_alive():
            seen.append(_answers(target, embedder)[1])
            if len(seen) >= reads:
                stop.set()
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    return seen


def test_reader_sees_old_or_new_index_during_fast_swaps(tmp_path, tiny_embedder, swap_mode):
    cfg = IndexConfig(chunk_tokens=64, overlap=8)
    corpus_a = make_small_corpus(tmp_path / "a")
    corpus_b = make_small_corpus(tmp_path / "b")
    write_doc(corpus_b, "office.md", "Office guide", "The office opens at 9 am; hours changed in May.")
    (corpus_b / "buoys" / "osprey.md").unlink()
    build_index(corpus_a, tmp_path / "A", cfg, embedder=tiny_embedder)
    build_index(corpus_b, tmp_path / "B", cfg, embedder=tiny_embedder)
    expected = {_answers(tmp_path / v, tiny_embedder)[1] for v in "AB"}
    assert len(expected) == 2
    target = tmp_path / "index"
    shutil.copytree(tmp_path / "A", target)
    swaps = []

    def swapper(stop):
        while not stop.is_set() or len(swaps) < 50:
            with staged_dir(target) as stage:
                for f in (tmp_path / "AB"[len(swaps) % 2]).iterdir():
                    shutil.copy2(f, stage / f.name)
            swaps.append(1)

    seen = _read_while(target, tiny_embedder, swapper, reads=30)
    assert len(seen) >= 30 and len(swaps) >= 50
    assert set(seen) <= expected  # every load saw one whole index, A or B


def test_reader_never_fails_while_the_index_is_rebuilt(tmp_path, tiny_embedder):
    cfg = IndexConfig(chunk_tokens=64, overlap=8)
    corpus = make_small_corpus(tmp_path / "corpus")
    target = tmp_path / "index"
    build_index(corpus, target, cfg, embedder=tiny_embedder)

    def rebuilds(stop):
        for i in range(8):
            write_doc(corpus, "office.md", "Office guide", f"The office opens at {i} am.")
            build_index(corpus, target, cfg, embedder=tiny_embedder)

    seen = _read_while(target, tiny_embedder, rebuilds)
    assert seen
    assert read_manifest(target)["counts"]["documents"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".index.") and p.is_dir()]


def test_missing_index_is_still_an_input_error(tmp_path, tiny_embedder):
    with pytest.raises(InputError, match="no manifest.json there"):
        Retriever.load(tmp_path / "nope", embedder=tiny_embedder)


def _index_and_next_build(tmp_path, embedder):
    """tmp_path/index (built from a corpus) and tmp_path/B (the same corpus one edit later)."""
    cfg = IndexConfig(chunk_tokens=64, overlap=8)
    corpus = make_small_corpus(tmp_path / "a")
    build_index(corpus, tmp_path / "index", cfg, embedder=embedder)
    write_doc(corpus, "office.md", "Office guide", "The office opens at 9 am; hours changed in May.")
    build_index(corpus, tmp_path / "B", cfg, embedder=embedder)
    return tmp_path / "index", tmp_path / "B"


def _swap_once_before(real, target, src, calls):
    """`real`, wrapped: the first call first swaps a copy of `src` into `target` (as a build does)."""
    def wrapped(*args, **kwargs):
        if not calls:
            with staged_dir(target) as stage:
                for f in src.iterdir():
                    shutil.copy2(f, stage / f.name)
        calls.append(1)
        return real(*args, **kwargs)
    return wrapped


def test_a_swap_during_the_faiss_load_does_not_restart_the_load(tmp_path, tiny_embedder, swap_mode, monkeypatch):
    # The snapshot pins its files when it opens and connects the store first, so a build that
    # replaces (and removes) the directory while FAISS loads leaves this load whole, on the old index.
    import faiss

    target, nxt = _index_and_next_build(tmp_path, tiny_embedder)
    old, loads = read_manifest(target), []
    monkeypatch.setattr(faiss, "deserialize_index", _swap_once_before(faiss.deserialize_index, target, nxt, loads))
    r = Retriever.load(target, embedder=tiny_embedder)
    assert len(loads) == 1 and r.manifest == old
    assert len(r) == old["counts"]["chunks"] == r.con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    assert read_manifest(target)["files"] != old["files"]  # the swap did happen


def test_a_swap_just_before_sqlite_opens_the_store_is_seen_and_the_load_retried(tmp_path, tiny_embedder, swap_mode,
                                                                                 monkeypatch):
    # SQLite opens the store by path; a swap between the snapshot and that open would hand it the
    # next build's store beside this build's FAISS rows. The path's inode is checked after the open.
    from retrieval import index_snapshot as snapshot_mod

    target, nxt = _index_and_next_build(tmp_path, tiny_embedder)
    new, opens = read_manifest(nxt), []
    monkeypatch.setattr(snapshot_mod.sqlite3, "connect", _swap_once_before(snapshot_mod.sqlite3.connect, target, nxt, opens))
    r = Retriever.load(target, embedder=tiny_embedder)
    assert len(opens) >= 2 and r.manifest == new  # retried, and the whole new index was loaded
    assert len(r) == new["counts"]["chunks"] == r.con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]


def test_load_retries_a_moved_index_then_gives_up_by_name(tmp_path, tiny_embedder, monkeypatch):
    from retrieval import retriever as retriever_mod

    target = tmp_path / "index"
    build_index(make_small_corpus(tmp_path / "corpus"), target, IndexConfig(chunk_tokens=64, overlap=8),
                embedder=tiny_embedder)
    real, moves = retriever_mod.Retriever._from_snapshot, []

    def moved_three_times(snap, embedder, *rest):
        if len(moves) < 3:
            moves.append(1)
            raise retriever_mod.IndexMoved()
        return real(snap, embedder, *rest)

    monkeypatch.setattr(retriever_mod.Retriever, "_from_snapshot", staticmethod(moved_three_times))
    assert Retriever.load(target, embedder=tiny_embedder).search("osprey", k=1) and len(moves) == 3

    def always_moved(snap, embedder, *rest):
        raise retriever_mod.IndexMoved()

    monkeypatch.setattr(retriever_mod.Retriever, "_from_snapshot", staticmethod(always_moved))
    monkeypatch.setattr(retriever_mod, "_LOAD_PATIENCE_S", 0.05)
    with pytest.raises(InputError, match=f"index_dir='{target}': kept changing while being opened"):
        Retriever.load(target, embedder=tiny_embedder)
