"""Property-based tests: the readers of user files end in data or InputError, never another exception,
and front matter groups are never lost."""

import json
import tempfile
import unicodedata
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")  # dev extra; skip rather than break a bare install
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from retrieval.corpus import Corpus, load_corpus  # noqa: E402
from core.errors import InputError  # noqa: E402
from core.qa import load_qa  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

# Lines that make front matter and JSONL interesting, mixed with arbitrary text.
FRAGMENTS = ["---", "--- ", "----", "+++", "...", "groups: [hr]", "groups:", "groups: []", "Groups: [hr]",
             "group: hr", "groups: hr, fin", "  - hr", "groups:\n  - hr", "title: T", "title: [x]", "- a", "{", "}",
             "[", "&a x", "*a", "<<: {groups: [hr]}", "date: 2023-02-30", "!!binary x", "? [a]", ": b", "# h", "",
             " ", "\t", "\ufeff", "\u2028", "\x00", "\x85"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@st.composite
def file_bytes(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    lines = draw(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=20), max_size=12))
    text = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(lines)
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le"])), errors="replace")


def _load(files: dict[str, bytes], **kw) -> Corpus | InputError:
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        try:
            return load_corpus(d, **kw)
        except InputError as exc:
            return exc


@FAST
@given(data=file_bytes(), suffix=st.sampled_from([".md", ".txt", ".markdown", ".jsonl"]),
       mode=st.sampled_from(["skip", "fail"]))
def test_any_file_is_documents_or_input_error(data, suffix, mode):
    out = _load({"f" + suffix: data}, on_bad_file=mode)
    if isinstance(out, Corpus):
        assert out.documents and all(d.text for d in out.documents)


GROUP_VALUES = JSON | st.lists(st.text(max_size=6), max_size=3) | st.text(max_size=6)


@st.composite
def jsonl_lines(draw):
    """Rows that are mostly documents, with any value under `groups` or a near-miss key."""
    rows = []
    for i in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 9)) == 0:
            rows.append(draw(JSON))
            continue
        row = {"id": f"d{i}", "text": draw(st.text(max_size=10))}
        for key in draw(st.lists(st.sampled_from(["groups", "Groups", "GROUPS", "group", " groups", "title", "x"]),
                                 max_size=2, unique=True)):
            row[key] = draw(GROUP_VALUES)
        rows.append(row)
    return rows


@FAST
@given(rows=jsonl_lines())
def test_jsonl_groups_are_kept_or_the_line_is_refused(rows):
    lines = [json.dumps(r) for r in rows]
    out = _load({"d.jsonl": "\n".join(lines).encode()})
    if isinstance(out, InputError):
        return
    by_line = {int(d.source.rsplit(":", 1)[1]): d for d in out.documents}
    for n, doc in by_line.items():
        row = rows[n - 1]
        assert isinstance(row, dict) and set(row) <= {"id", "title", "text", "groups"}
        if "groups" in row:
            want = row["groups"] if isinstance(row["groups"], list) else [row["groups"]]
            assert doc.groups and set(doc.groups) == {g.strip() for g in want}
        else:
            assert doc.groups == ()


# Names a caller can type: NFKC-stable (`ｈｒ`, `ſ` are refused with the name to write instead).
NAMES = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd")), min_size=1, max_size=6).filter(
    lambda s: s.lower() not in ("yes", "no", "on", "off", "true", "false", "null", "y", "n") and not s.isdigit()
    and unicodedata.normalize("NFKC", s) == s)


@st.composite
def restricted_file(draw):
    groups = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):
        gline = "groups: [" + ", ".join(groups) + "]"
    else:
        gline = "groups:\n" + "\n".join(f"  - {g}" for g in groups)
    # Only keys hybrid reads: any other key (`date:`, `tags:`) gets the file refused.
    meta = [gline] + draw(st.lists(st.sampled_from(["title: T", "# note", "# date: 2024-01-01"]),
                                   max_size=2, unique=True))
    meta = draw(st.permutations(meta))
    opener = draw(st.sampled_from(["---", "--- ", "---\t"]))
    closer = draw(st.sampled_from(["---", "---  "]))
    lead = draw(st.sampled_from(["", "\n", "\n \n", "  ", "\ufeff"]))
    body = draw(st.text(max_size=80))
    nl = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = lead + nl.join([opener, *meta, closer]) + nl + body
    raw = text.encode("utf-8")
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    return raw, set(groups), draw(st.sampled_from([".md", ".txt"])), body


@FAST
@given(case=restricted_file())
def test_front_matter_groups_are_never_lost(case):
    raw, groups, suffix, body = case
    out = _load({"doc" + suffix: raw})
    if not body.strip() or "\x00" in body:  # nothing to index, or refused as binary: never public either way
        assert isinstance(out, InputError) and "no non-empty documents" in str(out)
        return
    assert isinstance(out, Corpus), out  # well-formed front matter is read, not refused
    [doc] = out.documents
    assert set(doc.groups) == groups


# --- keys: any spelling of `groups` is read exactly or refused, never ignored -------------------------

# Format characters (category Cf) that render as nothing: zero-width space/joiners, soft hyphen, BOM,
# bidi marks and isolates, invisible operators, a tag letter.
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u200f", "\u202e", "\u2066",
             "\u2063", "\U000e0067"]
# Cyrillic, Greek and Latin-extension letters that look like the Latin ones of `groups`.
LOOK_ALIKES = {"g": ["\u0261", "\u050d"], "r": ["\u0433"], "o": ["\u043e", "\u03bf", "\u041e", "\u039f", "0"],
               "u": ["\u03c5", "\u057d"], "p": ["\u0440", "\u03c1", "\u0420", "\u03a1"], "s": ["\u0455", "\u0405"]}


@st.composite
def groups_spellings(draw):
    """`groups` (or `group`) with letters swapped for look-alikes, upper-case or full-width ones, and
    invisible characters or separators inserted."""
    letters = []
    for c in draw(st.sampled_from(["groups", "group"])):
        how = draw(st.sampled_from(["keep", "keep", "upper", "full-width", "look-alike"]))
        letters.append({"keep": c, "upper": c.upper(), "full-width": chr(ord(c) + 0xFEE0)}.get(how)
                       or draw(st.sampled_from(LOOK_ALIKES[c])))
    for _ in range(draw(st.integers(0, 2))):
        letters.insert(draw(st.integers(0, len(letters))), draw(st.sampled_from(INVISIBLE + ["_", "-", " ", "\t"])))
    return "".join(letters)


# (key, whether it declares groups in some spelling): look-alikes, the real keys, other names, any text.
KEYS = (groups_spellings().map(lambda k: (k, True))
        | st.sampled_from(["groups", "title", "author", "date", "tags", "id", "text"]).map(lambda k: (k, k == "groups"))
        | st.text(max_size=12).map(lambda k: (k, False)))
YAML_KEYS = KEYS | (st.integers() | st.none() | st.booleans()).map(lambda k: (k, False))  # `1:`, `null:`, `true:`
VALUES = st.lists(NAMES, min_size=1, max_size=3) | NAMES | JSON


def _yaml_line(key, value, style: str) -> str:
    """One front matter line; `json` keys read back exactly, `plain` ones as YAML sees them (the real attack)."""
    if style == "plain" and isinstance(key, str):
        return f"{key}: {json.dumps(value)}"
    return f"{json.dumps(key, ensure_ascii=style == 'json')}: {json.dumps(value)}"


def _public_despite(doc, declared: bool) -> bool:
    return declared and doc.groups == ()


@FAST
@given(pairs=st.lists(st.tuples(YAML_KEYS, VALUES), min_size=1, max_size=4, unique_by=lambda p: repr(p[0][0])),
       style=st.sampled_from(["json", "raw", "plain"]), mode=st.sampled_from(["skip", "fail"]),
       suffix=st.sampled_from([".md", ".txt"]))
def test_front_matter_keys_are_read_exactly_or_refused(pairs, style, mode, suffix):
    meta = "\n".join(_yaml_line(key, value, style) for (key, _), value in pairs)
    raw = f"---\n{meta}\n---\nCANARY restricted body\n".encode("utf-8", errors="replace")
    out = _load({"doc" + suffix: raw, "ok.md": b"public text"}, on_bad_file=mode)  # only InputError is caught
    if isinstance(out, InputError):  # under fail: one line naming the file
        assert mode == "fail" and f"doc{suffix}" in str(out) and "\n" not in str(out)
        return
    docs = [d for d in out.documents if d.id == "doc"]
    assert docs or [Path(w).name.split(":")[0] for w, _ in out.skipped] == ["doc" + suffix]  # where[:LINE]
    declared = any(groupish for (_, groupish), _ in pairs)
    for doc in docs:
        assert not _public_despite(doc, declared), pairs  # any spelling of groups: restricted or refused
        if style == "json":  # keys read back exactly: only the ones hybrid reads get a document through
            assert all(isinstance(k, str) and k in ("title", "groups") for (k, _), _ in pairs)


@FAST
@given(rows=st.lists(st.lists(st.tuples(KEYS, VALUES), max_size=3, unique_by=lambda p: p[0][0]), min_size=1,
                     max_size=4), ascii_only=st.booleans())
def test_jsonl_fields_are_read_exactly_or_refused(rows, ascii_only):
    records = []
    for i, pairs in enumerate(rows):
        record = {"id": f"d{i}", "text": f"CANARY {i}"}
        record.update((k, v) for (k, _), v in pairs if k not in ("id", "text"))
        records.append(record)
    out = _load({"d.jsonl": "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in records).encode(),
                 "ok.md": b"public text"})
    assert isinstance(out, Corpus)
    refused = {int(w.rsplit(":", 1)[1]) for w, _ in out.skipped}
    for doc in out.documents:
        if doc.id == "ok":
            continue
        n = int(doc.source.rsplit(":", 1)[1])
        assert n not in refused and set(records[n - 1]) <= {"id", "title", "text", "groups"}
        assert not _public_despite(doc, any(groupish for (_, groupish), _ in rows[n - 1]))
    assert len(out.documents) - 1 + len(refused) == len(records)


@FAST
@given(data=st.one_of(st.binary(max_size=300), st.lists(JSON, min_size=1, max_size=4).map(
    lambda rows: "\n".join(json.dumps(r) for r in rows).encode()), st.lists(st.fixed_dictionaries(
        {"id": JSON, "question": JSON, "answers": JSON}, optional={"gold_ids": JSON, "passages": JSON}),
        min_size=1, max_size=4).map(lambda rows: "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())))
def test_qa_reader_gives_rows_or_input_error(tmp_path, data):
    p = tmp_path / "qa.jsonl"
    p.write_bytes(data)
    try:
        rows = load_qa(p)
    except InputError:
        return
    assert rows and all(r.question.strip() and isinstance(r.answers, tuple) for r in rows)


@pytest.fixture(scope="module")
def index_for_properties(tmp_path_factory, tiny_embedder):
    from retrieval.index import IndexConfig, build_index
    from tests.conftest import make_small_corpus

    root = tmp_path_factory.mktemp("prop")
    out = root / "index"
    build_index(make_small_corpus(root / "corpus"), out, IndexConfig(chunk_tokens=64, overlap=8), embedder=tiny_embedder)
    return out


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))


@FAST
@given(data=st.data())
def test_manifest_loader_gives_a_valid_manifest_or_input_error(index_for_properties, tiny_embedder, data):
    from retrieval.index_snapshot import read_manifest, validate_manifest
    from retrieval.retriever import Retriever

    mpath = index_for_properties / "manifest.json"
    original = mpath.read_text()
    manifest = json.loads(original)
    if data.draw(st.booleans()):
        new = data.draw(JSON)
    else:  # one field of the real manifest replaced (or dropped)
        path = data.draw(st.sampled_from(list(_paths(manifest))[1:]))
        new, node = manifest, manifest
        for k in path[:-1]:
            node = node[k]
        if data.draw(st.booleans()):
            del node[path[-1]]
        else:
            node[path[-1]] = data.draw(JSON)
    try:
        mpath.write_text(json.dumps(new))
        try:
            got = read_manifest(index_for_properties)
        except InputError:
            return
        assert validate_manifest(got, "m") is got
        try:
            r = Retriever.load(index_for_properties, embedder=tiny_embedder)
        except InputError:
            return
        assert len(r) == got["counts"]["chunks"]
        r.search("battery", k=3)
    finally:
        mpath.write_text(original)
