"""Labelled text data sets for sparse probing, built offline from files a Debian machine installs.

Every data set is a list of text chunks with a class label and a fixed train/test split:

- ``lang`` (7 classes: en de es fr it nl pl): the manual pages of /usr/share/man/man*/ (English;
  Debian package ``manpages`` and every other package's pages) and /usr/share/man/<lang>/man*/ (packages
  ``manpages-de``, ``manpages-es``, ``manpages-fr``, ``manpages-it``, ``manpages-nl``, ``manpages-pl``).
  Each gzipped page is decoded as UTF-8 and stripped of roff markup (comments, requests and macros
  dropped, the text arguments of font and heading macros kept, escapes such as ``\\fB`` and ``\\-``
  resolved), then its whitespace is collapsed.
- ``code`` (5 classes): ``python`` (the standard library's .py files, next to the running Python's
  ``os`` module), ``c`` (C-only headers: /usr/include/linux/**/*.h, asm-generic/*.h, */sys/*.h and
  */bits/**/*.h, from ``libc6-dev`` and its ``linux-libc-dev``; other packages' headers in /usr/include
  include C++), ``cpp`` (the C++ standard library's headers /usr/include/c++/<version>/:
  ``libstdc++-12-dev``, pulled in by ``g++``), ``shell`` (the scripts in /usr/bin, /usr/sbin and /etc
  whose first line is a ``sh``/``bash``/``dash`` shebang, from essential packages such as ``gzip``) and
  ``perl`` (Perl modules ``*.pm`` under /usr/share/perl*, /usr/lib/*/perl*, with their POD
  documentation removed: ``perl``). Code keeps its line breaks.
- ``topic`` (7 classes): the sections ``library reference tutorial howto c-api faq whatsnew`` of the
  Python documentation's reStructuredText sources, /usr/share/doc/python3*/html/_sources/<section>/
  (package ``python3-doc``), whitespace collapsed.

How a class is built, deterministically: its files are listed, de-duplicated by real path and sorted,
then put in an order drawn with the seed. Each file's text is cut into consecutive windows of
``chunk_chars`` characters, each window trimmed to whole words (``trim_to_words``) and kept if it is at
least half that long and a quarter letters; a file's chunks are put in a seeded order. Chunks are then
taken round-robin (the first chunk of every file, in file order, then the second chunk of every file,
...), skipping exact duplicates, until the class has ``texts_per_class`` of them; files are read only as
far as needed. A class that cannot be filled raises FileNotFoundError naming the apt package to install.
The class's chunks are shuffled with the seed, and the last ``round(test_fraction * texts_per_class)``
(at least one) form its test split: every class has the same number of training and test texts.
Chunks of one file may fall on both sides of the split (they never overlap).
"""
from __future__ import annotations

import glob
import gzip
import itertools
import os
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

CHUNK_CHARS = 400
TEST_FRACTION = 0.25

PYTHON_STDLIB = Path(os.__file__).parent
MAN_ROOT = Path("/usr/share/man")
MAN_LANGUAGES = {"en": "manpages", "de": "manpages-de", "es": "manpages-es", "fr": "manpages-fr",
                 "it": "manpages-it", "nl": "manpages-nl", "pl": "manpages-pl"}
INCLUDE_ROOT = Path("/usr/include")
C_HEADER_GLOBS = ("linux/**/*.h", "asm-generic/*.h", "*/sys/*.h", "*/bits/**/*.h")   # under INCLUDE_ROOT
SCRIPT_DIRS = (Path("/usr/bin"), Path("/usr/sbin"), Path("/etc"))
PERL_GLOBS = ("/usr/share/perl*/**/*.pm", "/usr/lib/*/perl*/**/*.pm")
DOC_SOURCES_GLOB = "/usr/share/doc/python3*/html/_sources"
DOC_SECTIONS = ("library", "reference", "tutorial", "howto", "c-api", "faq", "whatsnew")


@dataclass(frozen=True)
class ProbeDataset:
    """Texts with labels (indices into `classes`) and a split (`is_test`), classes balanced."""
    name: str
    classes: tuple
    texts: tuple
    labels: tuple
    is_test: tuple
    sources: dict          # class -> where its texts came from

    def describe(self) -> dict:
        n_test = sum(self.is_test)
        return {"name": self.name, "classes": list(self.classes), "texts": len(self.texts),
                "train": len(self.texts) - n_test, "test": n_test, "sources": dict(self.sources)}


@dataclass(frozen=True)
class ClassSource:
    """One class: its files (a function, so nothing is read before it is needed), how to read a file
    as text, and the apt package that provides the files (named when they are missing)."""
    name: str
    package: str
    where: str
    list_files: Callable[[], list]
    read_text: Callable[[Path], str]
    accept: Optional[Callable[[str], bool]] = None     # a filter on chunks, if any


# ---- reading ---------------------------------------------------------------------------------

_ROFF_SPECIAL = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
                 "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "hy": "-",
                 "mi": "-", "pl": "+", "mu": "\u00d7", "<=": "\u2264", ">=": "\u2265", "->": "\u2192",
                 "ga": "`", "ha": "^", "ti": "~", "rs": "\\", "ss": "\u00df", "Fo": "\u00ab", "Fc": "\u00bb"}
# Macros (man and mdoc) whose arguments are running text; every other request or macro line is dropped.
_TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TP", "TQ", "UR",
                "MT", "Nm", "Nd", "Fl", "Ar", "Op", "Pa", "Cm", "Ic", "Ev", "Xr", "Sh", "Ss", "Dq", "Sq",
                "Ql", "Em", "Sy", "Li", "Va", "Fn", "Fa", "Ft", "Dv", "Er", "It", "Pp", "Xo", "Ad", "An", "Ms",
                "Tn", "Ux", "Bx", "Qq", "Pq", "Aq", "Ta"}
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),              # font changes
    (re.compile(r"\\s[+-]?(\[[^\]]*\]|\(..|\d+)"), ""),        # size changes
    (re.compile(r"\\[*n](\[[^\]]*\]|\(..|.)"), ""),           # strings and registers
    (re.compile(r"\\[kmMhvwxlLoDbNXzYZ]('[^']*'|\[[^\]]*\]|.)?"), ""),   # motions, drawing, colours
    (re.compile(r"\\[&%|^,/)c:!{}]"), ""),                    # zero-width and hyphenation marks
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == r"\-" else "\\"),
    (re.compile(r"\\[ ~0]"), " "),
]


def _roff_special(match: "re.Match") -> str:
    return _ROFF_SPECIAL.get(match.group(1).strip("[]()"), "")


def strip_roff(source: str) -> str:
    """Plain text from a man page's roff source, whitespace collapsed."""
    words = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", "\\\"")) or line.strip() in (".", "'"):
            continue
        if line[:1] in ".'":
            name, _, rest = line[1:].strip().partition(" ")
            if name not in _TEXT_MACROS:
                continue
            line = rest.replace('"', " ")
        line = line.split('\\"', 1)[0]                          # a trailing comment
        line = re.sub(r"\\(\(..|\[[^\]]*\])", _roff_special, line)
        for pattern, replacement in _ESCAPES:
            line = pattern.sub(replacement, line)
        line = line.replace("\\", "")
        words.extend(line.split())
    return " ".join(words)


# Common English words that are not words of the other languages (Dutch "is", "of", Polish "to" are left out).
ENGLISH_MARKERS = frozenset("the and with for this that are be by which from when you".split())
ENGLISH_MARKER_FRACTION = 0.03


def reads_as_english(text: str) -> bool:
    """At least 3% of the words are among ENGLISH_MARKERS (a translated page's untranslated paragraphs
    stay in English; such chunks are skipped from the other languages' classes)."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    return sum(w in ENGLISH_MARKERS for w in words) >= ENGLISH_MARKER_FRACTION * max(1, len(words))


def read_man_page(path: Path) -> str:
    with gzip.open(path, "rb") as fh:
        return strip_roff(fh.read().decode("utf-8", errors="replace"))


def read_plain(path: Path) -> str:
    """A text file, whitespace collapsed."""
    return " ".join(path.read_bytes().decode("utf-8", errors="replace").split())


def read_code(path: Path) -> str:
    """A source file with its line breaks; trailing spaces and runs of blank lines removed."""
    lines = [line.rstrip() for line in path.read_bytes().decode("utf-8", errors="replace").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_perl(path: Path) -> str:
    """A Perl module without its POD documentation (English prose between =head.../=cut)."""
    text = read_code(path)
    return re.sub(r"(?ms)^=[a-zA-Z]\w*.*?(^=cut\b[^\n]*$|\Z)", "", text).strip()


# ---- listing ---------------------------------------------------------------------------------

def _unique_sorted(paths: Iterable) -> list:
    """Regular files, one per real path (symlinks and merged-/usr duplicates collapse), sorted."""
    seen, out = set(), []
    for p in sorted(Path(p) for p in paths):
        try:
            if not p.is_file():
                continue
            real = os.path.realpath(p)
        except OSError:
            continue
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out


def man_pages(lang: str) -> list:
    folder = MAN_ROOT if lang == "en" else MAN_ROOT / lang
    return _unique_sorted(glob.glob(str(folder / "man*" / "*.gz")))


def python_sources() -> list:
    root = PYTHON_STDLIB
    return _unique_sorted(f for f in root.rglob("*.py")
                          if not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts))


def c_headers() -> list:
    """The kernel's user-space headers and the C library's sys/ and bits/ headers: C only (other
    packages' headers in /usr/include include C++ ones)."""
    found = (Path(f) for pattern in C_HEADER_GLOBS for f in glob.glob(str(INCLUDE_ROOT / pattern), recursive=True))
    return _unique_sorted(f for f in found if "c++" not in f.relative_to(INCLUDE_ROOT).parts)


def cpp_headers() -> list:
    return _unique_sorted(f for f in (INCLUDE_ROOT / "c++").glob("*/**/*") if f.is_file())


def shell_scripts() -> list:
    found = []
    for folder in SCRIPT_DIRS:
        for f in (folder.rglob("*") if folder.name == "etc" else folder.glob("*")):
            try:
                with open(f, "rb") as fh:
                    first = fh.readline(128)
            except OSError:        # folders, unreadable files
                continue
            if re.match(rb"#!\s*\S*/(env\s+)?(ba|da)?sh\b", first):
                found.append(f)
    return _unique_sorted(found)


def perl_modules() -> list:
    return _unique_sorted(f for pattern in PERL_GLOBS for f in glob.glob(pattern, recursive=True))


def doc_section(section: str) -> list:
    roots = sorted({os.path.realpath(r) for r in glob.glob(DOC_SOURCES_GLOB)})
    root = roots[0] if roots else "/nonexistent"
    return _unique_sorted(Path(root, section).rglob("*.txt"))


# ---- chunking --------------------------------------------------------------------------------

def trim_to_words(text: str, start: int, end: int) -> str:
    """text[start:end] without a word cut at either edge (a window edge inside a word moves to the
    word's far side), stripped."""
    window = text[start:end]
    if start > 0 and not text[start - 1].isspace() and not window[:1].isspace():
        cut = re.search(r"\s", window)
        window = window[cut.start():] if cut else ""
    if end < len(text) and not text[end].isspace() and not window[-1:].isspace():
        cut = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
        window = window[:cut] if cut >= 0 else ""
    return window.strip()


def text_chunks(text: str, chunk_chars: int) -> list:
    """Consecutive windows of chunk_chars characters trimmed to whole words, kept when at least half
    as long and at least a quarter letters."""
    chunks = []
    for start in range(0, len(text), chunk_chars):
        chunk = trim_to_words(text, start, start + chunk_chars)
        if len(chunk) >= chunk_chars // 2 and sum(c.isalpha() for c in chunk) >= len(chunk) / 4:
            chunks.append(chunk)
    return chunks


def collect_chunks(source: ClassSource, n: int, seed: int, chunk_chars: int) -> list:
    """n distinct chunks of the class, taken round-robin over its files in a seeded order (each file's
    chunks in a seeded order too); FileNotFoundError naming the apt package if there are fewer."""
    files = source.list_files()
    random.Random(seed).shuffle(files)
    per_file, chosen, seen = [], [], set()
    for rnd in itertools.count():
        progressed = False
        for i in range(len(files)):
            if i == len(per_file):                      # first visit: read the file now
                try:
                    chunks = text_chunks(source.read_text(files[i]), chunk_chars)
                except (OSError, EOFError, ValueError, zlib.error):   # unreadable or corrupt: nothing
                    chunks = []
                random.Random(seed * 1_000_003 + i).shuffle(chunks)
                per_file.append(chunks)
            if rnd < len(per_file[i]):
                progressed = True
                chunk = per_file[i][rnd]
                if chunk not in seen and (source.accept is None or source.accept(chunk)):
                    seen.add(chunk)
                    chosen.append(chunk)
                    if len(chosen) == n:
                        return chosen
        if not progressed:
            break
    raise FileNotFoundError(
        f"class {source.name!r}: {len(chosen)} text chunks of {chunk_chars} characters found in {len(files)} "
        f"file(s) of {source.where}, {n} needed: install the Debian package {source.package} "
        f"(apt-get install {source.package}) or ask for fewer texts per class")


# ---- the data sets ---------------------------------------------------------------------------

def lang_sources() -> list:
    return [ClassSource(lang, package, str(MAN_ROOT / ("" if lang == "en" else lang) / "man*" / "*.gz"),
                        lambda lang=lang: man_pages(lang), read_man_page,
                        None if lang == "en" else (lambda chunk: not reads_as_english(chunk)))
            for lang, package in MAN_LANGUAGES.items()]


def code_sources() -> list:
    return [
        ClassSource("python", "libpython3-stdlib", f"{PYTHON_STDLIB}/**/*.py", python_sources, read_code),
        ClassSource("c", "libc6-dev", " ".join(str(INCLUDE_ROOT / g) for g in C_HEADER_GLOBS), c_headers,
                    read_code),
        ClassSource("cpp", "libstdc++-12-dev", f"{INCLUDE_ROOT}/c++/*/", cpp_headers, read_code),
        ClassSource("shell", "gzip", " ".join(str(d) for d in SCRIPT_DIRS) + " (sh/bash shebang)",
                    shell_scripts, read_code),
        ClassSource("perl", "perl", " ".join(PERL_GLOBS), perl_modules, read_perl),
    ]


def topic_sources() -> list:
    return [ClassSource(section, "python3-doc", f"{DOC_SOURCES_GLOB}/{section}/**/*.txt",
                        lambda section=section: doc_section(section), read_plain)
            for section in DOC_SECTIONS]


DATASETS = {"lang": lang_sources, "code": code_sources, "topic": topic_sources}


def check_sizes(texts_per_class, test_fraction, chunk_chars) -> int:
    """The number of test texts per class; ValueError naming a bad argument."""
    for name, value in (("texts_per_class", texts_per_class), ("chunk_chars", chunk_chars)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if texts_per_class < 4:
        raise ValueError(f"texts_per_class must be >= 4 (at least 2 training and 1 test text), got {texts_per_class}")
    if chunk_chars < 16:
        raise ValueError(f"chunk_chars must be >= 16, got {chunk_chars}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, round(test_fraction * texts_per_class))
    if texts_per_class - n_test < 2:
        raise ValueError(f"test_fraction {test_fraction} leaves fewer than 2 training texts of {texts_per_class}")
    return n_test


def build_dataset(name: str, texts_per_class: int, seed: int = 0, test_fraction: float = TEST_FRACTION,
                  chunk_chars: int = CHUNK_CHARS) -> ProbeDataset:
    """The data set `name` (a key of DATASETS): texts_per_class chunks per class, the last
    round(test_fraction * texts_per_class) of each class's seeded order held out for testing."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
    n_test = check_sizes(texts_per_class, test_fraction, chunk_chars)
    texts, labels, is_test, where = [], [], [], {}
    sources = DATASETS[name]()
    for label, source in enumerate(sources):
        chunks = collect_chunks(source, texts_per_class, seed, chunk_chars)
        random.Random(seed * 7919 + label).shuffle(chunks)
        texts += chunks
        labels += [label] * len(chunks)
        is_test += [i >= len(chunks) - n_test for i in range(len(chunks))]
        where[source.name] = f"{source.where} (Debian package {source.package})"
    return ProbeDataset(name, tuple(s.name for s in sources), tuple(texts), tuple(labels), tuple(is_test), where)


def parse_dataset_names(spec: str) -> list:
    """'lang,code' -> ['lang', 'code']; ValueError naming an unknown data set."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise ValueError(f"--datasets: no data set named in {spec!r}: choose from {', '.join(DATASETS)}")
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"--datasets: unknown data set(s) {', '.join(map(repr, unknown))}: choose from "
                         f"{', '.join(DATASETS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--datasets: a data set is named twice in {spec!r}")
    return names
