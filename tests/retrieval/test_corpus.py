import json
import re
from pathlib import Path

import pytest

from retrieval.corpus import load_corpus, parse_front_matter
from core.errors import InputError
from tests.conftest import write_doc


def test_reads_markdown_text_and_jsonl_with_ids_titles_groups(tmp_path):
    write_doc(tmp_path, "a/b.md", "Bee", "body b", ["hr", "finance"])
    (tmp_path / "plain.txt").write_text("# Heading Title\nplain body")
    (tmp_path / "more.jsonl").write_text(json.dumps({"id": "j1", "text": "json body", "groups": ["x"]}) + "\n\n"
                                         + json.dumps({"id": "j2", "title": "Jay", "text": "two"}) + "\n")
    corpus = load_corpus(tmp_path)
    docs = {d.id: d for d in corpus.documents}
    assert set(docs) == {"a/b", "plain", "j1", "j2"}
    assert docs["a/b"].title == "Bee" and docs["a/b"].groups == ("finance", "hr") and docs["a/b"].text == "body b"
    assert docs["plain"].title == "Heading Title"
    assert docs["j1"].groups == ("x",) and docs["j2"].title == "Jay"
    assert docs["j1"].source.endswith("more.jsonl:1")


def test_content_hash_changes_with_text_and_groups(tmp_path):
    write_doc(tmp_path, "a.md", "A", "one")
    h1 = load_corpus(tmp_path).documents[0].content_hash
    write_doc(tmp_path, "a.md", "A", "one", ["hr"])
    h2 = load_corpus(tmp_path).documents[0].content_hash
    write_doc(tmp_path, "a.md", "A", "two", ["hr"])
    assert len({h1, h2, load_corpus(tmp_path).documents[0].content_hash}) == 3


def test_non_utf8_and_empty_files_are_skipped_and_counted_or_fail(tmp_path):
    write_doc(tmp_path, "ok.md", "OK", "fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write_doc(tmp_path, "empty.md", "Empty", "   \n")
    corpus = load_corpus(tmp_path)
    assert [d.id for d in corpus.documents] == ["ok"]
    reasons = sorted(r for _, r in corpus.skipped)
    assert reasons == ["empty document", "not UTF-8 text"]
    with pytest.raises(InputError, match="empty.md: empty document"):
        load_corpus(tmp_path, on_bad_file="fail")
    (tmp_path / "empty.md").unlink()
    with pytest.raises(InputError, match="latin1.txt: not UTF-8"):
        load_corpus(tmp_path, on_bad_file="fail")


@pytest.mark.parametrize("setup,pattern,mode", [
    (lambda p: None, "holds no .md", "skip"),
    (lambda p: (p / "x.jsonl").write_text('{"id": "a", "text": "t"}\n{not json\n'), r"x.jsonl:2: not valid JSON", "fail"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "t"}\n'), r"x.jsonl:1: field 'id'", "fail"),
    (lambda p: (p / "x.md").write_text("---\ntitle: [unclosed\n---\nbody"), r"x.md.*front matter is not valid YAML", "fail"),
    (lambda p: (p / "x.md").write_text("---\ngroups: 5\n---\nbody"), r"x.md: 'groups' must be a list", "fail"),
    (lambda p: ((p / "a.md").write_text("x"), (p / "a.jsonl").write_text('{"id": "a", "text": "t"}\n')),
     "duplicate document id 'a'", "skip"),
])
def test_bad_corpora_raise_one_clear_error(tmp_path, setup, pattern, mode):
    setup(tmp_path)
    with pytest.raises(InputError, match=pattern):
        load_corpus(tmp_path, on_bad_file=mode)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_corpus(tmp_path / "nope")


def test_front_matter_optional():
    assert parse_front_matter("no front matter", "f") == ({}, "no front matter")
    meta, body = parse_front_matter("---\ntitle: T\n---\nbody\n", "f")
    assert meta == {"title": "T"} and body == "body\n"


# --- front matter: recognised with its groups, or the file is refused; never public -----------------

FM = "---\ntitle: T\ngroups: [hr]\n---\nSECRET body\n"


@pytest.mark.parametrize("name,data", [
    ("bom.md", b"\xef\xbb\xbf" + FM.encode()),
    ("crlf.md", FM.replace("\n", "\r\n").encode()),
    ("cr.md", FM.replace("\n", "\r").encode()),
    ("blank_lines.md", b"\n \n\t\n" + FM.encode()),
    ("indented.md", b"   " + FM.encode()),
    ("bom_crlf.txt", b"\xef\xbb\xbf" + FM.replace("\n", "\r\n").encode()),
    ("trailing_spaces.md", b"---  \ngroups: [hr]\n--- \t\nSECRET body\n"),
    ("single_string.md", b"---\ngroups: hr\n---\nSECRET body\n"),
    ("merge_key.md", b"---\n<<: {groups: [hr]}\n---\nSECRET body\n"),
])
def test_front_matter_variants_are_recognised(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    corpus = load_corpus(tmp_path, on_bad_file="fail")
    [doc] = corpus.documents
    assert doc.groups == ("hr",) and doc.text == "SECRET body" and "groups" not in doc.text


REFUSED = [
    ("unclosed.md", b"---\ntitle: T\ngroups: [hr]\nSECRET body\n", "never closes"),
    ("unclosed_bom.md", b"\xef\xbb\xbf---\ngroups: [hr]\nSECRET body\n", "never closes"),
    ("only_opener.md", b"---", "never closes"),
    ("indented_closer.md", b"---\nnote: |\n  ---\ngroups: [hr]\nSECRET body\n", "never closes"),
    ("empty_value.md", b"---\ngroups:\n---\nSECRET body\n", "'groups' is empty"),
    ("null.md", b"---\ngroups: ~\n---\nSECRET body\n", "'groups' is empty"),
    ("empty_list.md", b"---\ngroups: []\n---\nSECRET body\n", "'groups' is empty"),
    ("empty_string.md", b"---\ngroups: ''\n---\nSECRET body\n", "'groups' is empty"),
    ("blank_names.md", b"---\ngroups: ['', ' ']\n---\nSECRET body\n", "'groups' is empty"),
    ("Capital.md", b"---\nGroups: [hr]\n---\nSECRET body\n", "'Groups' is not 'groups'"),
    ("upper.md", b"---\nGROUPS: [hr]\n---\nSECRET body\n", "'GROUPS' is not 'groups'"),
    ("singular.md", b"---\ngroup: hr\n---\nSECRET body\n", "'group' is not 'groups'"),
    ("title_case.md", b"---\nTitle: T\n---\nSECRET body\n", "'Title' is not 'title'"),
    ("ints.md", b"---\ngroups: [2027]\n---\nSECRET body\n", "'groups' must be a list of non-empty strings"),
    ("bools.md", b"---\ngroups: [yes]\n---\nSECRET body\n", "'groups' must be a list of non-empty strings"),
    ("mapping.md", b"---\ngroups: {hr: 1}\n---\nSECRET body\n", "'groups' must be a list"),
    ("comma.md", b"---\ngroups: hr, finance\n---\nSECRET body\n", "single string"),
    ("not_mapping.md", b"---\n- groups\n- hr\n---\nSECRET body\n", "must be a YAML mapping"),
    ("scalar.md", b"---\njust text\n---\nSECRET body\n", "must be a YAML mapping"),
    ("invalid_yaml.md", b"---\ngroups: [hr\n---\nSECRET body\n", "not valid YAML"),
    ("bad_date.md", b"---\ndate: 2023-02-30\ngroups: [hr]\n---\nSECRET body\n", "not valid YAML"),
    ("duplicate.md", b"---\ngroups: [hr]\ngroups: []\n---\nSECRET body\n", "duplicate key 'groups'"),
    ("dashes.md", b"----\ngroups: [hr]\n----\nSECRET body\n", "starts with '---'"),
    ("toml.md", b"+++\ngroups = ['hr']\n+++\nSECRET body\n", "TOML"),
    ("line_separators.md", "---\u2028groups: [hr]\u2028---\u2028SECRET body".encode(), "starts with '---'"),
    ("utf16.md", FM.encode("utf-16"), "UTF-16"),
    ("utf16le_no_bom.md", FM.encode("utf-16-le"), "NUL"),
    ("utf32.md", FM.encode("utf-32"), "UTF-16/UTF-32"),
    ("unknown_key.md", b"---\ngroups: [hr]\ndate: 2024-01-01\n---\nSECRET body\n", "'date' is not one hybrid reads"),
    ("zwj_opener.md", "\u200d---\ngroups: [hr]\n---\nSECRET body\n".encode(), "looks like '---' but is not"),
    ("em_dash_opener.md", "\u2014--\ngroups: [hr]\n---\nSECRET body\n".encode(), "looks like '---' but is not"),
    ("minus_opener.md", "\u2212\u2212\u2212\ngroups: [hr]\n---\nSECRET body\n".encode(), "looks like '---'"),
    ("fullwidth_opener.md", "\uff0d\uff0d\uff0d\ngroups: [hr]\n---\nSECRET body\n".encode(), "looks like '---'"),
]


@pytest.mark.parametrize("name,data,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_ambiguous_front_matter_is_refused_never_public(tmp_path, name, data, reason):
    write_doc(tmp_path, "ok.md", "OK", "public text")
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=f"{name}.*{reason}.*--on-bad-file skip"):
        load_corpus(tmp_path, on_bad_file="fail")
    corpus = load_corpus(tmp_path, on_bad_file="skip")  # skipped with its reason, never indexed as public
    assert [d.id for d in corpus.documents] == ["ok"]
    [(where, why)] = corpus.skipped
    assert name in where and re.search(reason, why)


JSONL_REFUSED = [
    ('{"id": "a", "text": "SECRET", "groups": null}', "'groups' is empty"),
    ('{"id": "a", "text": "SECRET", "groups": []}', "'groups' is empty"),
    ('{"id": "a", "text": "SECRET", "groups": 5}', "'groups' must be a list"),
    ('{"id": "a", "text": "SECRET", "groups": {"hr": true}}', "'groups' must be a list"),
    ('{"id": "a", "text": "SECRET", "groups": [1]}', "'groups' must be a list of non-empty strings"),
    ('{"id": "a", "text": "SECRET", "groups": "hr,fin"}', "single string"),
    ('{"id": "a", "text": "SECRET", "Groups": ["hr"]}', "'Groups' is not 'groups'"),
    ('{"id": "a", "text": "SECRET", "GROUPS": ["hr"]}', "'GROUPS' is not 'groups'"),
    ('{"id": "a", "text": "SECRET", "group": "hr"}', "'group' is not 'groups'"),
    ('{"id": "a", "Text": "SECRET"}', "'Text' is not 'text'"),
    ('{"id": "a", "text": "SECRET", "groups": ["hr"], "groups": null}', "duplicate key 'groups'"),
    ('{"id": "a", "text": "SECRET", "title": 5}', "'title' must be a string"),
    ('[' * 100_000, "not valid JSON"),
]


@pytest.mark.parametrize("line,reason", JSONL_REFUSED)
def test_jsonl_lines_with_ambiguous_groups_are_refused_alone(tmp_path, line, reason):
    ok = json.dumps({"id": "ok", "text": "public", "groups": ["x"]})
    (tmp_path / "d.jsonl").write_text(ok + "\n" + line + "\n" + ok.replace('"ok"', '"ok2"') + "\n")
    with pytest.raises(InputError, match=f"d.jsonl:2: .*{reason}"):
        load_corpus(tmp_path, on_bad_file="fail")
    corpus = load_corpus(tmp_path)
    assert [(d.id, d.groups) for d in corpus.documents] == [("ok", ("x",)), ("ok2", ("x",))]
    assert [w for w, _ in corpus.skipped] == [f"{tmp_path / 'd.jsonl'}:2"]


def test_jsonl_bom_crlf_and_raw_line_separators(tmp_path):
    rows = [{"id": "a", "text": "one\u2028two\u0085three", "groups": ["hr"]}, {"id": "b", "text": "x"}]
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    docs = load_corpus(tmp_path, on_bad_file="fail").documents
    assert [(d.id, d.groups, d.text) for d in docs] == [("a", ("hr",), rows[0]["text"]), ("b", (), "x")]
    (tmp_path / "d.jsonl").write_bytes(body.encode("utf-16"))
    with pytest.raises(InputError, match="d.jsonl: UTF-16"):
        load_corpus(tmp_path, on_bad_file="fail")


# --- symbolic links -----------------------------------------------------------------------------------

def test_symlinks_leaving_the_corpus_are_skipped_with_a_warning(tmp_path, caplog):
    corpus_dir, outside = tmp_path / "corpus", tmp_path / "outside"
    write_doc(corpus_dir, "real.md", "Real", "inside text")
    write_doc(corpus_dir, "sub/deep.md", "Deep", "deep text")
    write_doc(outside, "secret.md", "Secret", "OUTSIDE text")
    (corpus_dir / "host.md").symlink_to(outside / "secret.md")
    (corpus_dir / "linked_dir").symlink_to(outside, target_is_directory=True)
    (corpus_dir / "dotdot.md").symlink_to(Path("..") / "outside" / "secret.md")
    (corpus_dir / "inside.md").symlink_to(corpus_dir / "real.md")  # links within the root are fine
    (corpus_dir / "alias").symlink_to(Path("sub"), target_is_directory=True)
    (corpus_dir / "sub" / "loop").symlink_to(corpus_dir, target_is_directory=True)  # must not recurse forever
    with caplog.at_level("WARNING", logger="retrieval.corpus"):
        corpus = load_corpus(corpus_dir, on_bad_file="fail")  # not a bad file: a policy skip, even under fail
    docs = {d.id: d.text for d in corpus.documents}
    assert docs == {"real": "inside text", "inside": "inside text", "sub/deep": "deep text", "alias/deep": "deep text"}
    assert not any("OUTSIDE" in t for t in docs.values())
    skipped = {Path(w).name: why for w, why in corpus.skipped}
    assert set(skipped) == {"host.md", "linked_dir", "dotdot.md"}
    assert all("outside the corpus directory" in why for why in skipped.values())
    assert sum("outside the corpus directory" in r.getMessage() for r in caplog.records) == 3


def test_corpus_dir_itself_may_be_a_symlink(tmp_path):
    write_doc(tmp_path / "real", "a.md", "A", "text")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert [d.id for d in load_corpus(tmp_path / "link").documents] == ["a"]


# --- size guard -----------------------------------------------------------------------------------------

def test_documents_over_max_document_mb_are_refused(tmp_path):
    write_doc(tmp_path, "small.md", "S", "small")
    write_doc(tmp_path, "big.md", "B", "x" * 30_000)
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "j", "text": "y" * 30_000}) + "\n")
    with pytest.raises(InputError, match=r"big.md: document is 0.03 MB, over --max-document-mb 0.02"):
        load_corpus(tmp_path, on_bad_file="fail", max_document_mb=0.02)
    corpus = load_corpus(tmp_path, max_document_mb=0.02)
    assert [d.id for d in corpus.documents] == ["small"]
    assert sorted(Path(w).name for w, _ in corpus.skipped) == ["big.md", "d.jsonl:1"]
    assert len(load_corpus(tmp_path).documents) == 3  # the default (64 MB) takes them


# --- keys: exactly one hybrid reads, or the file (line) is refused; look-alikes of `groups` named ------

FULL_WIDTH_GROUPS = "".join(chr(ord(c) + 0xFEE0) for c in "groups")  # ｇｒｏｕｐｓ
KEY_REFUSALS = [  # (key as written in YAML, the key as Python reads it, what the line says about it)
    ("groups\u200b", "groups\u200b", "is not 'groups'; spell it 'groups' (it has look-alike"),
    ("gr\u043eups", "gr\u043eups", "is not 'groups'; spell it 'groups' (it has look-alike"),
    (FULL_WIDTH_GROUPS, FULL_WIDTH_GROUPS, "is not 'groups'; spell it 'groups' (it has look-alike"),
    ("\u200dgroups", "\u200dgroups", "is not 'groups'"),
    ("gr\u03bfup\u0455", "gr\u03bfup\u0455", "is not 'groups'"),  # Greek omicron, Cyrillic dze
    ("t\u0456tle", "t\u0456tle", "is not 'title'"),
    ("author", "author", "is not one hybrid reads (it reads title, groups); delete the key"),
    ("1", 1, "(type int, not a name) is not one hybrid reads"),
    ("null", None, "(type NoneType, not a name) is not one hybrid reads"),
    ("2024-01-01", __import__("datetime").date(2024, 1, 1), "(type date, not a name) is not one hybrid reads"),
]


@pytest.mark.parametrize("written,key,says", KEY_REFUSALS, ids=[ascii(k[0]) for k in KEY_REFUSALS])
def test_front_matter_keys_hybrid_does_not_read_are_refused(tmp_path, written, key, says):
    write_doc(tmp_path, "ok.md", "OK", "public text")
    (tmp_path / "x.md").write_text(f"---\ntitle: T\n{written}: [hr]\n---\nSECRET body\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert [d.id for d in corpus.documents] == ["ok"]
    [(where, why)] = corpus.skipped
    assert where.endswith("x.md") and why.startswith(f"front matter key {ascii(key)}") and says in why
    with pytest.raises(InputError) as exc:
        load_corpus(tmp_path, on_bad_file="fail")
    line = str(exc.value)
    assert line.startswith(f"{tmp_path / 'x.md'}: front matter key {ascii(key)}") and says in line
    assert "\n" not in line and line.isascii()  # one line, the hidden character shown as \u200b


JSONL_KEY_REFUSALS = [(k, says) for _, k, says in KEY_REFUSALS[:6]] + [
    ("author", "field 'author' is not one hybrid reads (it reads id, title, text, groups); delete the key"),
    ("1", "field '1' is not one hybrid reads"),  # JSON keys are always strings
    ("", "field '' is not one hybrid reads"),
    ("t\u0435xt", "field 't\\u0435xt' is not 'text'"),
]


@pytest.mark.parametrize("key,says", JSONL_KEY_REFUSALS, ids=[ascii(k) for k, _ in JSONL_KEY_REFUSALS])
def test_jsonl_fields_hybrid_does_not_read_are_refused(tmp_path, key, says):
    ok = json.dumps({"id": "ok", "text": "public"})
    bad = json.dumps({"id": "a", "text": "SECRET", key: ["hr"]}, ensure_ascii=False)
    (tmp_path / "d.jsonl").write_text(f"{ok}\n{bad}\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert [d.id for d in corpus.documents] == ["ok"]
    [(where, why)] = corpus.skipped
    assert where == f"{tmp_path / 'd.jsonl'}:2" and why.startswith(f"field {ascii(key)}") and says in why
    with pytest.raises(InputError) as exc:
        load_corpus(tmp_path, on_bad_file="fail")
    assert str(exc.value).startswith(f"{tmp_path / 'd.jsonl'}:2: field {ascii(key)}") and says in str(exc.value)


def test_a_canary_under_a_look_alike_groups_key_never_comes_out(tmp_path):
    canary = "CANARY-7f3e restricted text"
    spellings = ["groups\u200b", "gr\u043eups", FULL_WIDTH_GROUPS, "gro\u00adups", "\ufeffgroups", "gr\u03bfups",
                 "Gr\u043eups", "groups\u2060", "group\u0455", "g\u0433oups"]
    for i, key in enumerate(spellings):
        (tmp_path / f"fm{i}.md").write_text(f"---\ntitle: T{i}\n{key}: [hr]\n---\n{canary} {i}\n", encoding="utf-8")
    rows = [{"id": f"j{i}", "text": f"{canary} {i}", key: ["hr"]} for i, key in enumerate(spellings)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)))
    write_doc(tmp_path, "public.md", "Public", "nothing secret here")
    corpus = load_corpus(tmp_path)
    assert [d.id for d in corpus.documents] == ["public"]
    assert not any("CANARY" in d.text + d.title + d.id for d in corpus.documents)
    assert len(corpus.skipped) == 2 * len(spellings)


def test_an_error_quotes_at_most_80_characters_of_a_huge_key(tmp_path):
    key = "groups\u200b" + "x" * 1_000_000
    # `? key` is YAML's explicit key: a plain `key:` is capped at 1024 characters by the parser
    (tmp_path / "x.md").write_text(f"---\n? {key}\n: [hr]\n---\nSECRET\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "j", "text": "SECRET", key: ["hr"]}) + "\n")
    for name, what in (("d.jsonl", "field"), ("x.md", "front matter key")):  # files are read in name order
        with pytest.raises(InputError) as exc:
            load_corpus(tmp_path, on_bad_file="fail")
        line = str(exc.value)
        quoted = re.search(rf"{what} (\S+) is not", line).group(1)
        assert len(quoted) <= 80 and quoted.startswith("'groups\\u200bxxx") and quoted.endswith("...")
        assert name in line and len(line) < len(str(tmp_path)) + 300
        (tmp_path / name).unlink()


GROUP_NAME_REFUSALS = [
    ('["hr\\u200b"]', "group name 'hr\\u200b' has invisible or control characters"),
    ('["h\\u0000r"]', "group name 'h\\x00r' has invisible or control characters"),
    ('["hr", "f\\u2028in"]', "group name 'f\\u2028in' has invisible or control characters"),
    (f'["{chr(0xFF48)}{chr(0xFF52)}"]', "group name '\\uff48\\uff52' is not in Unicode NFKC form"),
    ('["\\ufb01nance"]', "write it as 'finance'"),  # the ligature fi
]


@pytest.mark.parametrize("value,says", GROUP_NAME_REFUSALS)
def test_group_names_no_caller_can_type_are_refused(tmp_path, value, says):
    (tmp_path / "x.md").write_text(f"---\ngroups: {value}\n---\nSECRET\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(f'{{"id": "j", "text": "SECRET", "groups": {value}}}\n', encoding="utf-8")
    write_doc(tmp_path, "ok.md", "OK", "public")
    corpus = load_corpus(tmp_path)
    assert [d.id for d in corpus.documents] == ["ok"]
    assert len(corpus.skipped) == 2 and all(says in why for _, why in corpus.skipped)
