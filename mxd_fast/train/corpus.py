"""Training text from Hugging Face `datasets`: folders written by Dataset.save_to_disk / DatasetDict.save_to_disk,
and local json, csv, parquet or text files read with datasets.load_dataset. Either is read as a stream, document
by document (a save_to_disk folder stays memory-mapped, files are read with streaming=True): a corpus larger
than memory trains as well as a small one.

How --text (and --eval-text) is read, by --text-format:

    auto      a folder holding dataset_info.json and state.json (Dataset.save_to_disk) or dataset_dict.json
              (DatasetDict.save_to_disk) is a dataset; anything else is text files (data.read_documents)
    files     text files only: .txt .rst .md .text one document per file, .jsonl one per line
    dataset   save_to_disk folders only
    json, csv, parquet, text
              files, folders of such files or glob patterns, read with datasets.load_dataset(<format>,
              data_files=..., streaming=True); "text" gives one document per line, as datasets reads it

datasets is imported only when a dataset is opened.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .extras import require

BUILDER_FORMATS = ("json", "csv", "parquet", "text")
TEXT_FORMATS = ("auto", "files", "dataset", *BUILDER_FORMATS)
BUILDER_SUFFIXES = {"json": (".json", ".jsonl"), "csv": (".csv",), "parquet": (".parquet",), "text": (".txt",)}
COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz", ".zst")
DATASET_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))
SHUFFLE_BUFFER = 10_000   # documents in datasets' shuffle buffer (the order within a pass)
SHARDS = 256              # shards of a save_to_disk dataset, whose order is shuffled each pass


def held_out_hash(text: str) -> float:
    """A number in [0, 1) from the text alone: a document is held out when it falls below the held-out
    fraction, whatever the order or number of the documents."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", errors="replace")).digest()[:8], "little") / 2.0 ** 64


def is_saved_dataset(path) -> bool:
    """Whether `path` is a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    folder = Path(path)
    return folder.is_dir() and any(all((folder / name).is_file() for name in names) for names in DATASET_MARKERS)


def dataset_format(paths: Sequence[str], text_format: str) -> Optional[str]:
    """How `paths` are read under --text-format `text_format`: "dataset" (save_to_disk folders), a
    load_dataset builder name, or None for text files. ValueError when the paths do not fit the format."""
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"unknown format {text_format!r}: choose one of {', '.join(TEXT_FORMATS)}")
    if text_format == "files":
        return None
    if text_format in BUILDER_FORMATS:
        return text_format
    saved = [is_saved_dataset(p) for p in paths]
    if text_format == "dataset":
        for path, is_saved in zip(paths, saved):
            if not is_saved:
                raise ValueError(f"{path}: not a folder written by save_to_disk (it has neither dataset_info.json "
                                 "and state.json nor dataset_dict.json)")
        return "dataset"
    if all(saved):
        return "dataset"
    if any(saved):
        datasets_given = [p for p, s in zip(paths, saved) if s]
        raise ValueError(f"{' '.join(datasets_given)}: save_to_disk folders cannot be read together with text "
                         "files; give one kind")
    return None


def builder_files(paths: Sequence[str], builder: str) -> list[str]:
    """The files load_dataset(`builder`) reads: each file given, the files of each folder (recursively) whose
    names end in the builder's suffixes (compressed or not), the matches of each glob pattern."""
    suffixes = tuple(s + c for s in BUILDER_SUFFIXES[builder] for c in COMPRESSION_SUFFIXES)
    files: list[str] = []
    for p in paths:
        if not str(p).strip():
            raise FileNotFoundError("an empty path (an unset variable?)")
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(suffixes))
            if not found:
                raise FileNotFoundError(f"{p}: no {'/'.join(BUILDER_SUFFIXES[builder])} files in the folder")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file or folder {p}")
            files += builder_files(matches, builder)
    return files


def _saved_dataset(datasets, path: str, split: str):
    """The save_to_disk folder `path` (the split `split` of a DatasetDict), memory-mapped, as a stream of
    SHARDS shards. ValueError naming the folder, and the splits when `split` is not one of them."""
    try:
        saved = datasets.load_from_disk(path)
    except Exception as err:   # datasets' own errors (an empty dataset fails with IndexError, for one)
        raise ValueError(f"{path}: datasets cannot read it ({type(err).__name__}: {err})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"{path}: no split {split!r} (--text-split); its splits: {', '.join(saved)}")
        saved = saved[split]
    return saved.to_iterable_dataset(num_shards=max(1, min(len(saved), SHARDS)))


def _text_column(stream, column: str, where: str):
    """`stream` cut to its column `column`; ValueError naming the column and listing the columns there are."""
    features = stream.features
    names = stream.column_names
    if names is None:   # csv and some json files say their columns only once read
        first = next(iter(stream), None)
        if first is None:
            return stream   # no rows: no documents, said by the caller
        names = list(first)
    if column not in names:
        raise ValueError(f"{where}: no column {column!r} (--text-column); its columns: {', '.join(names)}")
    dtype = getattr(features[column], "dtype", None) if features is not None and column in features else None
    if dtype is not None and dtype not in ("string", "large_string"):
        raise ValueError(f"{where}: column {column!r} (--text-column) holds {features[column]}, not text")
    return stream.select_columns([column])


def open_dataset(paths: Sequence[str], how: str, column: str = "text", split: str = "train") -> "StreamedCorpus":
    """The documents of `paths` read as `how` (dataset_format's answer, not None): column `column` of every
    row, split `split` of a DatasetDict. Nothing is read yet beyond the columns' names."""
    require("datasets", what="reading a datasets dataset")
    import datasets
    if how == "dataset":
        parts = [_text_column(_saved_dataset(datasets, str(p), split), column, str(p)) for p in paths]
        stream = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        description = f"{' '.join(map(str, paths))} (datasets, column {column!r})"
    else:
        files = builder_files(paths, how)
        try:
            stream = datasets.load_dataset(how, data_files=files, split="train", streaming=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"datasets cannot read {' '.join(map(str, paths))} as {how} ({err})") from None
        stream = _text_column(stream, column, " ".join(map(str, paths)))
        description = f"{' '.join(map(str, paths))} ({how} files read with datasets, column {column!r})"
    return StreamedCorpus(stream, column, description)


def read_text(paths: Sequence[str], text_format: str = "auto", column: str = "text",
              split: str = "train") -> tuple:
    """(documents, description) of `paths` as --text reads them under --text-format `text_format`: a list of
    strings for text files (data.read_documents), a StreamedCorpus for a dataset (not read yet)."""
    how = dataset_format(paths, text_format)
    if how is None:
        from .data import read_documents
        return read_documents(paths), " ".join(map(str, paths))
    corpus = open_dataset(paths, how, column, split)
    return corpus, corpus.description


class StreamedCorpus:
    """The documents of a datasets IterableDataset, read pass by pass without holding them: iterating it gives
    them in the dataset's order; documents(...) gives one rank's share of a shuffled pass. split() divides it
    into the training and held-out documents by a hash of each text (as data.split_documents divides a list)."""

    def __init__(self, stream, column: str, description: str, part: str = "all", fraction: float = 0.0):
        self.stream, self.column, self.description = stream, column, description
        self.part, self.fraction = part, fraction

    def split(self, fraction: float) -> tuple["StreamedCorpus", "StreamedCorpus"]:
        """(training, held-out): the documents whose held_out_hash is at least `fraction`, and the others."""
        return tuple(StreamedCorpus(self.stream, self.column, self.description, part, fraction)
                     for part in ("train", "held_out"))

    def _texts(self, stream) -> Iterator[str]:
        for row in stream:
            text = row[self.column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{self.description}: a row's column {self.column!r} holds a "
                                 f"{type(text).__name__}, not text")
            if text.strip() and (self.part == "all"
                                 or (held_out_hash(text) < self.fraction) == (self.part == "held_out")):
                yield text

    def documents(self, epoch: int = 0, seed: int = 0, shuffle: bool = False, rank: int = 0,
                  world: int = 1) -> Iterator[str]:
        """Documents rank, rank + world, ... of pass `epoch`: in the dataset's order, or shuffled (datasets'
        shuffle: the order of the shards and a buffer of SHUFFLE_BUFFER documents, seeded by `seed` and
        `epoch`), the same order on every rank."""
        stream = self.stream
        if shuffle:
            stream = stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
            stream.set_epoch(epoch)
        return itertools.islice(self._texts(stream), rank, None, world)

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def first(self) -> Optional[str]:
        """The first document, or None if there is none (which reads the whole stream)."""
        return next(self.documents(), None)

    def __repr__(self) -> str:
        part = "" if self.part == "all" else f", {self.part} (hash fraction {self.fraction:g})"
        return f"StreamedCorpus({self.description}{part})"
