"""The trainer's --text as a Hugging Face `datasets` dataset: save_to_disk folders (Dataset and DatasetDict) and
local json/csv/parquet/text files, read as a stream, deterministic, resumable, split between ranks as text files
are, refused by name when a column or split is missing; and a tiny training run on each form."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")

from mxd_fast.train import corpus as C  # noqa: E402
from mxd_fast.train import data as D  # noqa: E402

WORDS = "the a model layer expert token sparse dense matrix gate decoder python function value list".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    """n distinct documents."""
    rng = random.Random(seed)
    return [f"document {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."
            for i in range(n)]


class _RecordingTokenizer:
    """One token per character; remembers the documents it encoded."""
    eos_token_id = 0

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        self.seen.append(text)
        return {"input_ids": [1 + ord(c) % 200 for c in text]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 40 documents as a Dataset folder, a DatasetDict folder (train/validation), jsonl, csv and
    parquet files (column "body" beside an id), and text files; and 8 other documents for evaluation."""
    root = tmp_path_factory.mktemp("datasets")
    docs, held = _texts(40), _texts(8, seed=9)
    table = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    table.save_to_disk(str(root / "dataset"))
    datasets.DatasetDict({"train": table, "validation": datasets.Dataset.from_dict({"text": held})}).save_to_disk(
        str(root / "dict"))
    body = table.rename_column("text", "body")
    (root / "files").mkdir()
    body.to_json(str(root / "files" / "part.jsonl"))
    body.to_csv(str(root / "files" / "part.csv"), index=False)
    body.to_parquet(str(root / "files" / "part.parquet"))
    (root / "textfiles").mkdir()
    for i, doc in enumerate(docs):
        (root / "textfiles" / f"{i:02d}.txt").write_text(doc)
    return {"root": root, "docs": docs, "held": held}


# ---- reading ---------------------------------------------------------------------------------------

def test_auto_tells_a_saved_dataset_from_a_folder_of_text_files(data):
    root = data["root"]
    assert C.dataset_format([str(root / "dataset")], "auto") == "dataset"
    assert C.dataset_format([str(root / "dict")], "auto") == "dataset"
    assert C.dataset_format([str(root / "dict" / "validation")], "auto") == "dataset"   # a split's own folder
    assert C.dataset_format([str(root / "textfiles")], "auto") is None
    assert C.dataset_format([str(root / "dataset")], "files") is None
    assert C.dataset_format([str(root / "files" / "part.csv")], "csv") == "csv"
    with pytest.raises(ValueError, match="save_to_disk folders cannot be read together with text files"):
        C.dataset_format([str(root / "dataset"), str(root / "textfiles")], "auto")
    with pytest.raises(ValueError, match="textfiles: not a folder written by save_to_disk"):
        C.dataset_format([str(root / "textfiles")], "dataset")


@pytest.mark.parametrize("form", ["dataset", "dict", "jsonl", "csv", "parquet", "folder-of-parquet", "glob"])
def test_every_form_reads_the_documents_in_their_order(data, form):
    root, docs = data["root"], data["docs"]
    paths, how, column = {
        "dataset": ([root / "dataset"], "auto", "text"),
        "dict": ([root / "dict"], "auto", "text"),
        "jsonl": ([root / "files" / "part.jsonl"], "json", "body"),
        "csv": ([root / "files" / "part.csv"], "csv", "body"),
        "parquet": ([root / "files" / "part.parquet"], "parquet", "body"),
        "folder-of-parquet": ([root / "files"], "parquet", "body"),
        "glob": ([root / "files" / "*.jsonl"], "json", "body"),
    }[form]
    corpus, description = C.read_text([str(p) for p in paths], how, column)
    assert isinstance(corpus, C.StreamedCorpus) and f"column {column!r}" in description
    assert list(corpus) == docs


def test_text_files_read_with_datasets_give_a_document_per_line(data, tmp_path):
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    corpus, _ = C.read_text([str(tmp_path / "lines.txt")], "text")
    assert list(corpus) == ["first line", "second line"]   # the empty line is no document
    docs, description = C.read_text([str(data["root"] / "textfiles")], "auto")
    assert docs == data["docs"] and description == str(data["root"] / "textfiles")


def test_a_missing_column_split_or_file_is_refused_by_name(data, tmp_path):
    root = data["root"]
    with pytest.raises(ValueError, match=r"no column 'body' \(--text-column\); its columns: text, id"):
        C.read_text([str(root / "dataset")], "auto", "body")
    with pytest.raises(ValueError, match=r"no column 'text' \(--text-column\); its columns: body, id"):
        C.read_text([str(root / "files" / "part.csv")], "csv")     # csv names its columns once read
    with pytest.raises(ValueError, match=r"dict: no split 'test' \(--text-split\); its splits: train, validation"):
        C.read_text([str(root / "dict")], "auto", split="test")
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(str(tmp_path / "numbers"))
    with pytest.raises(ValueError, match=r"column 'text' \(--text-column\) holds .*int64.*, not text"):
        C.read_text([str(tmp_path / "numbers")], "auto")
    with pytest.raises(FileNotFoundError, match="no .json/.jsonl files in the folder"):
        C.read_text([str(root / "textfiles")], "json")
    with pytest.raises(FileNotFoundError, match="no file or folder .*missing"):
        C.read_text([str(tmp_path / "missing.parquet")], "parquet")
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        C.read_text([str(root / "dataset")], "xml")


# ---- passes, ranks, memory ----------------------------------------------------------------------------

def test_a_pass_is_a_seeded_shuffle_and_ranks_read_disjoint_documents(data):
    corpus, _ = C.read_text([str(data["root"] / "dataset")], "auto")
    docs = data["docs"]
    first = list(corpus.documents(epoch=0, seed=3, shuffle=True))
    assert sorted(first) == sorted(docs) and first != docs
    assert list(corpus.documents(epoch=0, seed=3, shuffle=True)) == first          # the same run reads the same
    assert list(corpus.documents(epoch=1, seed=3, shuffle=True)) != first          # another order each pass
    assert list(corpus.documents(epoch=0, seed=4, shuffle=True)) != first
    for world in (2, 3):
        shares = [list(corpus.documents(0, 3, True, rank, world)) for rank in range(world)]
        for rank, share in enumerate(shares):
            assert share == first[rank::world]                                    # documents r, r + N, ...


def test_token_streams_of_two_ranks_read_disjoint_documents_of_a_dataset(data):
    corpus, _ = C.read_text([str(data["root"] / "dataset")], "auto")
    tokenizers = [_RecordingTokenizer() for _ in range(2)]
    streams = [D.TokenStream(corpus, tok, 16, seed=1, rank=r, world=2) for r, tok in enumerate(tokenizers)]
    for stream in streams:
        while stream.epoch == 0:
            stream.next_contexts(1)   # at most one document a call: each is longer than a context
    first_pass = [tok.seen[:len(tok.seen) - 1] for tok in tokenizers]   # the last one begins the next pass
    assert set(first_pass[0]).isdisjoint(first_pass[1])
    assert sorted(first_pass[0] + first_pass[1]) == sorted(data["docs"])


def test_the_stream_holds_a_bounded_number_of_documents(tmp_path):
    """Reading the first contexts pulls the shuffle buffer's documents, not the corpus."""
    pulled = []

    def rows():
        for i in range(3 * C.SHUFFLE_BUFFER):
            pulled.append(i)
            yield {"text": f"document {i}"}

    corpus = C.StreamedCorpus(datasets.IterableDataset.from_generator(rows), "text", "generated")
    stream = D.TokenStream(corpus, _RecordingTokenizer(), 8, seed=0)
    stream.next_contexts(2)
    assert 0 < len(pulled) <= C.SHUFFLE_BUFFER + 100
    pulled.clear()
    D.TokenStream(corpus, _RecordingTokenizer(), 8, shuffle=False).next_contexts(2)
    assert len(pulled) < 50


def test_a_token_stream_of_a_dataset_resumes_exactly_across_passes(data):
    corpus, _ = C.read_text([str(data["root"] / "dataset")], "auto")
    small = C.StreamedCorpus(corpus.stream.take(5), corpus.column, "five")
    tok = _RecordingTokenizer()
    for source in (corpus, small):
        stream = D.TokenStream(source, tok, 16, seed=2, rank=1, world=2)
        stream.next_contexts(7)
        state = stream.state_dict()
        want = stream.next_contexts(60)              # the small corpus: several passes
        again = D.TokenStream(source, tok, 16, seed=2, rank=1, world=2)
        again.load_state_dict(state)
        assert torch.equal(again.next_contexts(60), want)
        assert again.state_dict() == stream.state_dict()
    assert stream.epoch >= 1


def test_a_stream_with_no_document_for_a_rank_is_refused(data):
    corpus, _ = C.read_text([str(data["root"] / "dataset")], "auto")
    one = C.StreamedCorpus(corpus.stream.take(1), corpus.column, "one document")
    with pytest.raises(ValueError, match="rank 1 of 2 has no document to read .*fewer documents than ranks"):
        D.TokenStream(one, _RecordingTokenizer(), 8, rank=1, world=2).next_contexts(1)


def test_the_held_out_split_and_contexts_match_those_of_the_same_documents_in_a_list(data):
    corpus, _ = C.read_text([str(data["root"] / "dataset")], "auto")
    docs = data["docs"]
    train, held = D.split_documents(corpus, 0.2)
    list_train, list_held = D.split_documents(docs, 0.2)
    assert list_held and list(train) == list_train and list(held) == list_held
    tok = _RecordingTokenizer()
    assert torch.equal(D.held_out_contexts(held, tok, 16, 9), D.held_out_contexts(list_held, tok, 16, 9))


def test_tools_read_a_run_s_held_out_documents_as_the_trainer_read_its_dataset(tmp_path):
    # probe, steer and inspect re-read the run's text: a jsonl column must not be read as raw text lines
    from mxd_fast.train.run_folders import RunFolder, held_out_documents
    docs = _texts(400, seed=3)
    datasets.Dataset.from_dict({"body": docs}).to_json(str(tmp_path / "part.jsonl"))
    train = {"text": [str(tmp_path / "part.jsonl")], "text_format": "json", "text_column": "body",
             "text_split": "train", "eval_text": None}
    held, description = held_out_documents(RunFolder(tmp_path, {"train": train}, None, 0, "mxd", 8), None)
    expected = D.split_documents(docs, 0.02)[1]
    assert len(expected) >= 2 and list(held) == expected
    assert description.startswith("the held-out documents of ")


# ---- training on a dataset -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and the trainer's arguments of tests/test_distributed.py (6 steps), without --text."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from test_distributed import _tiny_model_and_text
    args = _tiny_model_and_text(tmp_path_factory.mktemp("tiny"))
    i = args.index("--text")
    return args[:i] + args[i + 2:]


def _run(args, out, *extra):
    from mxd_fast import train as T
    return T.main([*args, "--out", str(out), *extra])


def test_training_on_a_dataset_is_deterministic_and_resumes_exactly(tiny, data, tmp_path):
    from safetensors.torch import load_file
    text = ["--text", str(data["root"] / "dataset"), "--eval-text", str(data["root"] / "dict" / "validation"),
            "--eval-tokens", "32", "--seed", "3", "--log-every", "2"]
    metrics = _run(tiny, tmp_path / "a", *text)
    assert metrics["tokens"] == 384 and math.isfinite(metrics["nmse"]) and math.isfinite(metrics["delta_ce"])
    _run(tiny, tmp_path / "b", *text)
    assert _run(tiny, tmp_path / "part", *text, "--stop-after", "3")["stopped"]
    _run(tiny, tmp_path / "part", *text, "--resume")
    a = load_file(str(tmp_path / "a" / "layer.safetensors"))
    for other in ("b", "part"):
        b = load_file(str(tmp_path / other / "layer.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a), other
        losses = [[h["loss"] for h in json.loads((tmp_path / run / "history.json").read_text())]
                  for run in ("a", other)]
        assert losses[0] == losses[1], other
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "(datasets, column 'text')" in config["corpus"] and config["train"]["text_format"] == "auto"


def test_a_dataset_dict_split_and_parquet_files_train_with_their_held_out_text(tiny, data, tmp_path, capsys):
    root = data["root"]
    metrics = _run(tiny, tmp_path / "dict", "--text", str(root / "dict"), "--text-split", "validation",
                   "--eval-text", str(root / "dataset"), "--eval-tokens", "32")
    assert math.isfinite(metrics["ce_spliced"])
    metrics = _run([a for a in tiny if a != "--quiet"], tmp_path / "parquet", "--text", str(root / "files"),
                   "--text-format", "parquet", "--text-column", "body", "--eval-tokens", "32")
    assert math.isfinite(metrics["nmse"])
    assert "training documents read as a stream; held-out documents read as a stream (held out: those whose " \
           "text hash falls in the lowest 2%)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--resume: .* other options \\(--text-column 'body' -> 'text'"):
        _run(tiny, tmp_path / "parquet", "--text", str(root / "files"), "--text-format", "parquet", "--resume",
             "--tokens", "768")


@pytest.mark.parametrize("extra,message", [
    (["--text", "{root}/dataset", "--text-column", "body"], "--text: .*no column 'body' (--text-column); its columns: "
                                                             "text, id"),
    (["--text", "{root}/dict", "--text-split", "test"], "--text: .*no split 'test' (--text-split); its splits: train, "
                                                        "validation"),
    (["--text", "{root}/files", "--text-format", "csv", "--text-split", "validation"],
     "--text-split validation: files read with --text-format csv form one split, train"),
    (["--text", "{root}/textfiles", "--text-column", "body"], "--text-column chooses from a datasets dataset"),
    (["--text", "{root}/dataset", "{root}/textfiles"], "--text: .*cannot be read together with text files"),
    (["--text", "{root}/textfiles", "--text-format", "dataset"], "--text: .*textfiles: not a folder written by "
                                                                  "save_to_disk"),
    (["--text", "{root}/bad.jsonl", "--text-format", "json"], "--text: "),
    (["--text", "{root}/dataset", "--eval-text", "{root}/blank"], "--eval-text: no documents in "),
    (["--text", "{root}/blank"], "--text: no training documents in .*(no row with text in the column)"),
])
def test_bad_dataset_input_is_refused_by_name_before_the_model_loads(tiny, data, tmp_path, monkeypatch, extra,
                                                                     message):
    root = data["root"]
    if not (root / "blank").exists():
        datasets.Dataset.from_dict({"text": ["  ", None]}).save_to_disk(str(root / "blank"))
        (root / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    monkeypatch.setattr(D, "load_model", lambda *a, **k: pytest.fail("the model loaded before the text was read"))
    with pytest.raises(SystemExit, match=re.escape(message).replace(r"\.\*", ".*")):
        _run(tiny, tmp_path / "bad", *(e.format(root=root) for e in extra))
    assert not (tmp_path / "bad").exists()


def test_two_ranks_train_on_a_dataset(tiny, data, tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import _torchrun
    out = tmp_path / "run"
    _torchrun([*tiny, "--text", str(data["root"] / "dataset"), "--eval-text", str(data["root"] / "dict" / "validation"),
               "--eval-tokens", "32", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["tokens"] == 384 and math.isfinite(metrics["delta_ce"])
    streams = [torch.load(out / f"checkpoint-rank{r}.pt", weights_only=False)["buffer"]["stream"] for r in range(2)]
    assert all(s["epoch"] == 0 and s["pos"] > 0 for s in streams)   # each rank read its own share
    assert Path(out / "layer.safetensors").is_file()
