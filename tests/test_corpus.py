"""The embedded retrieval corpus must be reproducible, self-consistent and honest about failures."""

from pathlib import Path

import pytest

from colquant.evaluate import corpus as corpus_module
from colquant.evaluate.corpus import (
    DEFAULT_PAGE_SIZE,
    LAYOUTS,
    Corpus,
    build_corpus,
    corpus_statistics,
    load_corpus,
)

SMALL = {"n_pages": 8, "n_queries": 20, "page_size": (224, 288), "progress": False}


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("default") / "corpus", progress=False)


def test_default_build_has_enough_pages_queries_and_every_layout(default_corpus: Corpus) -> None:
    assert len(default_corpus) >= 60
    assert len(default_corpus.queries) >= 120
    assert {page.layout for page in default_corpus.pages} == set(LAYOUTS)
    image = default_corpus.image(default_corpus.pages[0].page_id)
    assert image.mode == "RGB" and image.size == DEFAULT_PAGE_SIZE


def test_every_answer_is_on_its_own_page_and_no_other(default_corpus: Corpus) -> None:
    texts = {page.page_id: page.text for page in default_corpus.pages}
    for query in default_corpus.queries:
        holders = [page_id for page_id, text in texts.items() if query.answer in text]
        assert holders == [query.page_id], (query, holders)


def test_qrels_name_exactly_one_relevant_page_per_query(default_corpus: Corpus) -> None:
    qrels = default_corpus.qrels
    assert set(qrels) == {query.query_id for query in default_corpus.queries}
    for query in default_corpus.queries:
        assert qrels[query.query_id] == {query.page_id: 1}
    assert len({query.text for query in default_corpus.queries}) == len(default_corpus.queries)


def test_statistics_cover_every_page_and_query(default_corpus: Corpus) -> None:
    stats = corpus_statistics(default_corpus)
    assert list(stats.index) == [*LAYOUTS, "all"]
    assert stats.loc["all", "pages"] == len(default_corpus)
    assert stats.loc["all", "queries"] == len(default_corpus.queries)
    assert stats.loc[list(LAYOUTS), "pages"].sum() == len(default_corpus)
    assert (stats["mean_text_chars"] > 100).all()


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = build_corpus(tmp_path / "a", seed=3, **SMALL)
    second = build_corpus(tmp_path / "b", seed=3, **SMALL)
    other = build_corpus(tmp_path / "c", seed=4, **SMALL)
    assert _file_bytes(first.root) == _file_bytes(second.root)
    assert (first.root / "manifest.json").read_bytes() == (second.root / "manifest.json").read_bytes()
    assert (first.root / "manifest.json").read_bytes() != (other.root / "manifest.json").read_bytes()
    assert first.pages[0].text != other.pages[0].text


def test_load_returns_what_build_returned(tmp_path: Path) -> None:
    built = build_corpus(tmp_path / "corpus", **SMALL)
    assert load_corpus(tmp_path / "corpus") == built


def test_cache_hit_rewrites_nothing(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    built = build_corpus(root, **SMALL)
    before = _mtimes(root)
    assert build_corpus(root, **SMALL) == built
    assert _mtimes(root) == before


def test_other_parameters_replace_an_existing_corpus(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    build_corpus(root, **SMALL)
    rebuilt = build_corpus(root, **{**SMALL, "n_queries": 30})
    assert len(rebuilt.queries) == 30
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_interrupted_build_leaves_no_corpus_and_keeps_the_old_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "corpus"
    old = build_corpus(root, **SMALL)
    render = corpus_module.render_page
    calls = []

    def render_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "render_page", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "fresh", **SMALL)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build_corpus(root, **{**SMALL, "seed": 9})
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]
    assert load_corpus(root) == old


def test_load_of_missing_corpus_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no corpus at .*build_corpus"):
        load_corpus(tmp_path / "nowhere")


def test_missing_page_image_is_named(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    build_corpus(root, **SMALL)
    (root / "pages" / "p0003.png").unlink()
    with pytest.raises(ValueError, match=r"p0003\.png"):
        load_corpus(root)


def test_directory_with_other_files_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a colquant corpus"):
        build_corpus(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("overrides", "parameter"),
    [
        ({"n_pages": 0}, "n_pages"),
        ({"n_pages": 2.5}, "n_pages"),
        ({"n_queries": 0}, "n_queries"),
        ({"n_pages": 4, "n_queries": 21}, "n_queries"),
        ({"seed": "0"}, "seed"),
        ({"page_size": (576, 448)}, "page_size"),
        ({"page_size": (100, 200)}, "page_size"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, overrides: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        build_corpus(tmp_path / "corpus", **{**SMALL, **overrides})
    assert not (tmp_path / "corpus").exists()
