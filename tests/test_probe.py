"""Sparse probing (python -m mxd_fast.probe): the data sets, pooling, the probing core, the command line's
checks and one small run on the embedded model."""
from __future__ import annotations

import importlib.util
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import mxd_fast  # noqa: E402
import mxd_fast.probe as entry  # noqa: E402
from mxd_fast.train import probe as P  # noqa: E402
from mxd_fast.train import probe_data as D  # noqa: E402
from mxd_fast.train import save_layer  # noqa: E402

WORDS = {
    "en": "the file is read and written by the program when you give this option for which the value",
    "de": "die Datei wird vom Programm gelesen und geschrieben wenn Sie diese Option angeben",
    "es": "el archivo es leído y escrito por el programa cuando usted da esta opción",
    "fr": "le fichier est lu et écrit par le programme quand vous donnez cette option",
    "it": "il file viene letto e scritto dal programma quando si indica questa opzione",
    "nl": "het bestand wordt gelezen en geschreven door het programma als u deze optie geeft",
    "pl": "plik jest czytany i zapisywany przez program gdy podasz tę opcję",
}


def _roff_page(lang: str, number: int) -> bytes:
    words = WORDS[lang].split()
    body = "\n".join(f".PP\n\\fB{words[i % len(words)]}\\fP {' '.join(words[i:] + words[:i])} {number}-{i}"
                     for i in range(40))
    return gzip.compress(f'.\\" comment\n.TH PAGE{number} 1\n.SH NAME\n{body}\n'.encode())


@pytest.fixture
def fake_man(tmp_path, monkeypatch):
    """A man tree with 3 pages per language (English in man1/, the others in <lang>/man1/)."""
    for lang in WORDS:
        folder = tmp_path / "man" / ("" if lang == "en" else lang) / "man1"
        folder.mkdir(parents=True)
        for n in range(3):
            (folder / f"page{n}.1.gz").write_bytes(_roff_page(lang, n))
    monkeypatch.setattr(D, "MAN_ROOT", tmp_path / "man")
    return tmp_path / "man"


@pytest.fixture
def fake_code(tmp_path, monkeypatch):
    """Two files per code class, in folders standing for the stdlib, /usr/include, /usr/bin and perl."""
    lines = {
        "stdlib/mod{n}.py": "def function_{n}_{i}(value):\n    return [v * {i} for v in value if v]\n",
        "include/linux/h{n}.h": "struct item_{n}_{i} {{\n\tint value;\n\tchar *name;\n}};\n",
        "include/c++/12/bits/h{n}.h": "template<typename T>\nclass box_{n}_{i} {{ public: T value; }};\n",
        "bin/script{n}": "for f in \"$@\"; do echo \"$f\" {n} {i}; done\n",
        "perl/Mod{n}.pm": "sub run_{i} {{ my ($self) = @_; return $self->{{value_{n}}}; }}\n",
    }
    for pattern, line in lines.items():
        for n in range(2):
            path = tmp_path / pattern.format(n=n)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(line.format(n=n, i=i) for i in range(40))
            if path.suffix == ".pm":
                text += "\n=head1 NAME\n\nThis prose is documentation, removed.\n\n=cut\n"
            path.write_text(("#!/bin/sh\n" if "bin" in pattern else "") + text)
    monkeypatch.setattr(D, "PYTHON_STDLIB", tmp_path / "stdlib")
    monkeypatch.setattr(D, "INCLUDE_ROOT", tmp_path / "include")
    monkeypatch.setattr(D, "SCRIPT_DIRS", (tmp_path / "bin",))
    monkeypatch.setattr(D, "PERL_GLOBS", (str(tmp_path / "perl" / "**" / "*.pm"),))
    return tmp_path


@pytest.fixture
def fake_docs(tmp_path, monkeypatch):
    root = tmp_path / "doc" / "python3.11" / "html" / "_sources"
    for section in D.DOC_SECTIONS:
        (root / section).mkdir(parents=True)
        for n in range(2):
            (root / section / f"page{n}.rst.txt").write_text(
                " ".join(f"The {section} page {n} says thing {i} about Python." for i in range(80)))
    monkeypatch.setattr(D, "DOC_SOURCES_GLOB", str(tmp_path / "doc" / "python3*" / "html" / "_sources"))
    return root


def _check_balanced(ds: D.ProbeDataset, per_class: int) -> None:
    labels, is_test = np.array(ds.labels), np.array(ds.is_test)
    n_test = max(1, round(D.TEST_FRACTION * per_class))
    for c in range(len(ds.classes)):
        assert (labels == c).sum() == per_class
        assert (is_test[labels == c]).sum() == n_test
    assert len(set(ds.texts)) == len(ds.texts)


@pytest.mark.parametrize("name", list(D.DATASETS))
def test_builders_are_deterministic_and_balanced(name, fake_man, fake_code, fake_docs):
    first = D.build_dataset(name, 8, seed=3, chunk_chars=120)
    second = D.build_dataset(name, 8, seed=3, chunk_chars=120)
    assert first == second
    _check_balanced(first, 8)
    assert D.build_dataset(name, 8, seed=4, chunk_chars=120).texts != first.texts   # the seed matters
    for text, label in zip(first.texts, first.labels):
        assert 60 <= len(text) <= 120
        assert "\\f" not in text and "=head1" not in text and "documentation, removed" not in text


def test_lang_classes_read_their_language(fake_man):
    ds = D.build_dataset("lang", 6, chunk_chars=150)
    for text, label in zip(ds.texts, ds.labels):
        lang = ds.classes[label]
        assert any(word in text.split() for word in WORDS[lang].split()[:6]), (lang, text)


@pytest.mark.parametrize("name,remove,package", [
    ("lang", "man/pl", "manpages-pl"), ("lang", "man/man1", "manpages"),
    ("code", "include/linux", "libc6-dev"), ("code", "include/c++", "libstdc++-12-dev"),
    ("code", "perl", "perl"), ("topic", "doc", "python3-doc")])
def test_missing_source_names_its_package(name, remove, package, tmp_path, fake_man, fake_code, fake_docs):
    import shutil
    shutil.rmtree(tmp_path / remove)
    with pytest.raises(FileNotFoundError, match=re.escape(f"apt-get install {package})")):
        D.build_dataset(name, 8, chunk_chars=120)


def test_corrupt_files_are_skipped(fake_man):
    page = _roff_page("de", 9)
    folder = fake_man / "de" / "man1"
    (folder / "header.1.gz").write_bytes(page[:4] + b" not gzip data")       # EOFError
    (folder / "truncated.1.gz").write_bytes(page[:40])                       # EOFError
    (folder / "corrupt.1.gz").write_bytes(page[:10] + b"\xff" * 50)         # zlib.error
    (folder / "crc.1.gz").write_bytes(page[:-8] + b"\0" * 8)                # BadGzipFile (an OSError)
    broken = D.build_dataset("lang", 6, chunk_chars=150)
    _check_balanced(broken, 6)
    assert "9-" not in " ".join(broken.texts)


def test_too_few_texts_names_the_package(fake_man):
    with pytest.raises(FileNotFoundError, match=re.escape("class 'en'") + ".*apt-get install manpages\\)"):
        D.build_dataset("lang", 10_000, chunk_chars=120)


def test_builder_refuses_bad_sizes_by_name():
    with pytest.raises(ValueError, match="texts_per_class"):
        D.build_dataset("lang", 3)
    with pytest.raises(ValueError, match="test_fraction"):
        D.build_dataset("lang", 8, test_fraction=1.0)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        D.build_dataset("nope", 8)
    with pytest.raises(TypeError, match="texts_per_class"):
        D.build_dataset("lang", 8.0)


def test_strip_roff():
    source = ('.\\" a comment\n.TH LS 1 "2022"\n.SH BESCHREIBUNG\n\\fBls\\fP [\\fI\\,OPTION\\/\\fP]\\(em '
              'Liste \\- sortiert \\(lqalles\\(rq\n.nf\n.B \\-\\-all\nEnde.')
    assert D.strip_roff(source) == "BESCHREIBUNG ls [OPTION]\u2014 Liste - sortiert \u201calles\u201d --all Ende."


def test_english_paragraphs_are_kept_out_of_other_languages():
    assert D.reads_as_english("This option is used by the program when you want the file.")
    assert not D.reads_as_english("Diese Option wird vom Programm benutzt, wenn Sie die Datei wollen.")
    assert not D.reads_as_english("Ta opcja jest używana przez program, być może to plik.")   # "być", "to"


def test_trim_to_words():
    text = "alpha beta gamma delta"
    assert D.trim_to_words(text, 0, 8) == "alpha"       # "be" cut
    assert D.trim_to_words(text, 8, 22) == "gamma delta"   # "ta" cut
    assert D.trim_to_words(text, 6, 16) == "beta gamma"


def test_parse_dataset_names():
    assert D.parse_dataset_names("topic, lang") == ["topic", "lang"]
    for bad in ("", "lang,lang", "lang,klingon"):
        with pytest.raises(ValueError, match="--datasets"):
            D.parse_dataset_names(bad)


# The data sets from the installed sources (make test installs their Debian packages).

@pytest.mark.parametrize("name", list(D.DATASETS))
def test_installed_data_sets_are_deterministic_and_balanced(name):
    try:
        first = D.build_dataset(name, 12)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert D.build_dataset(name, 12) == first
    _check_balanced(first, 12)
    assert len(first.classes) >= 4


# ---- pooling and probing ---------------------------------------------------------------------

def test_pool_sparse_equals_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    batch, tokens, k, width = 3, 7, 4, 11
    values = torch.rand(batch, tokens, k, generator=g)
    indices = torch.randint(0, width, (batch, tokens, k), generator=g)
    indices[0, 0] = 5                                  # the same feature twice in one token: summed
    mask = torch.rand(batch, tokens, generator=g) > 0.3
    mask[2] = False                                    # a text without tokens pools to zero
    dense = torch.zeros(batch, tokens, width).scatter_add_(2, indices, values)
    counts = mask.sum(1, keepdim=True).clamp_min(1)
    expected = (dense * mask[..., None]).sum(1) / counts
    torch.testing.assert_close(P.pool_sparse(values, indices, mask, width), expected)
    torch.testing.assert_close(P.pool_dense(dense, mask), expected)
    assert P.pool_sparse(values, indices, mask, width)[2].abs().sum() == 0


def test_pool_sparse_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        P.pool_sparse(torch.rand(2, 3, 4), torch.zeros(2, 3, 5, dtype=torch.long),
                      torch.ones(2, 3, dtype=torch.bool), 9)


def _synthetic(n_classes=4, per_class=40, width=30, planted=True, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    features = rng.normal(size=(labels.size, width)).astype(np.float32)
    if planted:   # feature 10 + c is 5 higher for class c
        features[np.arange(labels.size), 10 + labels] += 5.0
    is_test = np.tile(np.arange(per_class) >= per_class * 3 // 4, n_classes)
    return features, labels, is_test


def test_a_planted_feature_is_found_at_k_1():
    features, labels, is_test = _synthetic()
    result = P.sparse_probe(features, labels, is_test, [1, 2, 5])
    assert result["mean"][1] >= 0.95
    assert all(scores[1] >= 0.9 for scores in result["per_class"].values())
    train = ~is_test
    rows, binary = P.balanced_one_vs_rest(labels[train], 2, np.random.default_rng(0))
    assert P.top_k_by_mean_difference(features[train][rows], binary, 1).tolist() == [12]


def test_noise_features_give_chance():
    features, labels, is_test = _synthetic(planted=False)
    result = P.sparse_probe(features, labels, is_test, [1, 5, 20])
    for k in (1, 5, 20):
        assert 0.3 <= result["mean"][k] <= 0.7, result["mean"]


def test_k_beyond_the_width_is_not_run():
    features, labels, is_test = _synthetic(width=16)
    result = P.sparse_probe(features, labels, is_test, [1, 20])
    assert result["mean"][20] is None and result["mean"][1] is not None


def test_balanced_one_vs_rest():
    labels = np.repeat(np.arange(4), 9)
    rows, binary = P.balanced_one_vs_rest(labels, 1, np.random.default_rng(0))
    assert binary.sum() == 9 and (binary == 0).sum() == 9
    assert set(labels[rows[binary == 1]]) == {1}
    assert set(labels[rows[binary == 0]]) == {0, 2, 3}


def test_probing_is_deterministic():
    features, labels, is_test = _synthetic(planted=False)
    assert P.sparse_probe(features, labels, is_test, [1, 2], seed=5) == P.sparse_probe(features, labels, is_test,
                                                                                        [1, 2], seed=5)


# ---- the command line's checks (no model loaded) ---------------------------------------------

def _run_folder(path: Path, layer_module, layer_index=6, model="embedded:model.gguf") -> str:
    extra = {"model": {"name": model, "layer": layer_index}} if layer_index is not None else None
    save_layer(layer_module, path, extra)
    return str(path)


def _tiny_mxd(d=576, k=4):
    torch.manual_seed(0)
    return mxd_fast.MxD(d, 48, d, 32, k, activation="silu", glu=True)


def _tiny_transcoder(d=576, k=4):
    torch.manual_seed(1)
    return mxd_fast.TopKTranscoder(d, 40, d, k)


@pytest.mark.parametrize("argv,message", [
    (["--mxd", "{tmp}/missing"], "--mxd: no run folder"),
    (["--transcoder", "{tmp}/empty"], "--transcoder: .* is not a run folder"),
    (["--mxd", "{mxd}", "--datasets", "lang,klingon"], "--datasets: unknown data set"),
    (["--mxd", "{mxd}", "--transcoder", "{tc15}"], "--mxd \\(layer 6\\) and --transcoder \\(layer 15\\)"),
    (["--mxd", "{mxd}", "--layer", "3"], "--layer 3 differs from the layer 6"),
    (["--mxd", "{mxd}", "--model", "other.gguf"], "--model other.gguf differs"),
    (["--datasets", "lang"], "--layer is needed"),
    (["--layer", "2"], "--out is needed"),
    (["--mxd", "{mxd}", "--texts-per-class", "3"], "--texts-per-class must be >= 4"),
    (["--mxd", "{mxd}", "--test-fraction", "0"], "--test-fraction must be in"),
    (["--mxd", "{mxd}", "--ks", "1,0"], "--ks"),
    (["--mxd", "{mxd}", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--mxd", "{tc}"], "--mxd: .* holds a TopKTranscoder, not a MxD"),
    (["--transcoder", "{mxd}"], "--transcoder: .* holds a MxD, not a TopKTranscoder"),
])
def test_command_line_refuses_bad_input_by_name(tmp_path, argv, message, capsys):
    (tmp_path / "empty").mkdir()
    names = {"tmp": str(tmp_path), "mxd": _run_folder(tmp_path / "mxd", _tiny_mxd(d=8)),
             "tc": _run_folder(tmp_path / "tc", _tiny_transcoder(d=8)),
             "tc15": _run_folder(tmp_path / "tc15", _tiny_transcoder(d=8), layer_index=15)}
    argv = [a.format(**names) for a in argv]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        P.run(argv)
    assert entry.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m mxd_fast.probe: error:")


def test_missing_packages_are_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert entry.main(["--layer", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m mxd_fast.probe needs scikit-learn, not installed: pip install 'mxd_fast[train]'"]


# ---- on the embedded model ---------------------------------------------------------------------



def test_taps_read_the_mlp_input_and_its_neurons(embedded):
    model, tokenizer = embedded
    from mxd_fast.harvest import find_mlp
    _, _, mlp = find_mlp(model, 2)
    ids, attention, mask = P.padded_batch(P.tokenize_texts(tokenizer, ["int main(void) { return 0; }"], 16),
                                          tokenizer.pad_token_id, "cpu")
    taps = P.MLPTaps(model, 2, want_hidden=True)
    try:
        x, hidden = taps.run(ids, attention)
    finally:
        taps.close()
    torch.testing.assert_close(hidden, mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert not mask[0, 0] and mask[0, 1:].all()


def test_taps_read_an_mlp_split_across_its_block():
    # OPT's MLP is fc1 -> activation_fn -> fc2 inside the decoder layer: no module stands as the MLP
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(config).eval().requires_grad_(False)
    ids = torch.randint(4, 128, (2, 9))
    from mxd_fast.harvest import Harvester
    with Harvester(model, 1) as harvester:
        x_harvested, _ = harvester.harvest(ids)
    taps = P.MLPTaps(model, 1, want_hidden=True)
    try:
        x, hidden = taps.run(ids, torch.ones_like(ids))
    finally:
        taps.close()
    block = model.model.decoder.layers[1]
    torch.testing.assert_close(x.reshape(-1, 32), x_harvested)
    torch.testing.assert_close(hidden, block.activation_fn(block.fc1(x)))


def test_padding_does_not_change_a_text_s_features(embedded):
    model, tokenizer = embedded
    texts = ["a short one", "a much longer text with many more tokens in it than the first one has"]
    sets = P.model_feature_sets(576, 1536) + [P.layer_feature_set("mxd", _tiny_mxd())]
    together = P.collect_features(model, tokenizer, 2, sets, texts, 32, batch_size=2)
    alone = [P.collect_features(model, tokenizer, 2, sets, [t], 32, batch_size=1) for t in texts]
    for fs in sets:
        for i in range(2):
            np.testing.assert_allclose(together[fs.name][i], alone[i][fs.name][0], rtol=1e-4, atol=1e-5)


@pytest.fixture
def cached_model(embedded, monkeypatch):
    """run() gets the module's embedded model instead of loading it again."""
    from mxd_fast.harvest import load_model as real_load
    monkeypatch.setattr(P, "load_model", lambda name, device="cpu": embedded if name is None else real_load(name))
    return embedded


def test_a_layer_the_model_lacks_is_refused_by_name(cached_model, tmp_path, fake_docs):
    with pytest.raises(ValueError, match="--layer 30: .*0 .. 29"):
        P.run(["--layer", "30", "--datasets", "topic", "--texts-per-class", "4", "--out", str(tmp_path)])
    wide = _run_folder(tmp_path / "wide", _tiny_mxd(d=8), layer_index=2)
    with pytest.raises(ValueError, match="--mxd: the layer takes inputs of width 8, the model's blocks are 576 wide"):
        P.run(["--mxd", wide, "--datasets", "topic", "--texts-per-class", "4"])


def test_end_to_end_on_the_embedded_model(cached_model, tmp_path):
    mxd_run = _run_folder(tmp_path / "mxd", _tiny_mxd(), layer_index=2)
    tc_run = _run_folder(tmp_path / "tc", _tiny_transcoder(), layer_index=2)
    datasets = [name for name in D.DATASETS if _available(name)]
    if not datasets:
        pytest.skip("no data set's sources are installed")
    report = P.run(["--mxd", mxd_run, "--transcoder", tc_run, "--datasets", ",".join(datasets),
                    "--texts-per-class", "4", "--max-tokens", "12", "--ks", "1,2,5"])
    out = Path(mxd_run) / "probe"
    assert json.loads((out / P.RESULTS_JSON).read_text()) == json.loads(json.dumps(report))
    table = (out / P.RESULTS_MD).read_text()
    assert (out / P.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["layer"] == 2 and report["ks"] == [1, 2, 5]
    assert set(report["feature_sets"]) == {"mxd", "transcoder", "mlp_neurons", "residual"}
    assert report["feature_sets"]["mxd"]["width"] == 32 and report["feature_sets"]["mlp_neurons"]["width"] == 1536
    for name in datasets:
        assert f"## {name}:" in table
        for fs_name, acc in report["accuracy"][name].items():
            assert all(0.0 <= acc["mean"][k] <= 1.0 for k in ("1", "2", "5"))
            assert set(acc["per_class"]) == set(report["datasets"][name]["classes"])
            assert f"| {fs_name} |" in table


def _available(name: str) -> bool:
    try:
        D.build_dataset(name, 4)
    except FileNotFoundError:
        return False
    return True
