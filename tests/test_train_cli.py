"""The trainer as a user meets it: --help states every default, a missing `train` extra is one line naming
the install command (from the command line and from the library), `import mxd_fast` leaves the trainer out,
a Hub model that cannot be reached fails after one request, a failed start leaves no empty run folder, and
a run shows its progress (harvesting, training, evaluation), explains its summary and labels its plot."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXTRA = ("transformers", "tokenizers", "safetensors", "huggingface_hub", "gguf")
# run before anything else in a subprocess: the packages of the train extra cannot be imported
HIDE_EXTRA = f"import sys; sys.modules.update(dict.fromkeys({EXTRA!r}))\n"
INSTALL = "pip install 'mxd_fast[train]'"
needs_extra = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in EXTRA),
                                 reason="needs the train extra (pip install 'mxd_fast[train]')")


def _python(code: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _trainer(args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mxd_fast.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---- --help ------------------------------------------------------------------------------------

def _forms(value) -> set:
    """How a default may be written in a help text."""
    forms = {str(value)}
    if isinstance(value, int) and not isinstance(value, bool):
        forms.add(f"{value:,}")
    if isinstance(value, float):
        forms.add(f"{value:g}")
    return forms


def test_every_option_has_a_help_text_stating_its_default():
    from mxd_fast.train import cli
    parser = cli.build_parser()
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(options) >= 35
    tables = (cli.EMBEDDED_DEFAULTS, cli.EMBEDDED_GPU_DEFAULTS, cli.PAPER_DEFAULTS)
    for action in options:
        name, text = action.option_strings[-1], action.help or ""
        assert text.strip() and "default" in text, name
        expected = [action.default] if action.default not in (None, False) else []
        expected += [t[action.dest] for t in tables if t.get(action.dest) is not None]
        for value in expected:
            assert _forms(value) & {w.strip("(),;") for w in text.split()}, (name, value, text)
        if isinstance(action, argparse._StoreTrueAction):
            assert "default: off" in text, name
    by_name = {a.option_strings[-1]: a.help for a in options}
    # --tokens and --batch: the CPU and GPU defaults of the embedded model, and the defaults with --model
    assert "256,000 for the embedded model on a CPU, 20,000,000 on a GPU; 10,000,000 with --model" in by_name["--tokens"]
    assert "1,024 for the embedded model on a CPU, 4,096 on a GPU; 4,096 with --model" in by_name["--batch"]
    for option in ("--arch", "--lr", "--dtype", "--model-dtype", "--buffer", "--log-every", "--device", "--threads",
                   "--no-plot"):
        assert "default" in by_name[option], option


# ---- the train extra ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["python -m", "mxd-train"])
def test_the_command_without_the_train_extra_is_one_line_naming_the_install(tmp_path, how):
    out = tmp_path / "new" / "run"
    if how == "python -m":
        code = (f"import runpy; sys.argv = ['-m', '--out', {str(out)!r}]\n"
                "runpy.run_module('mxd_fast.train', run_name='__main__', alter_sys=True)")
        prog = "python -m mxd_fast.train"
    else:   # what the console script mxd-train = mxd_fast.train.cli:main does
        code = (f"sys.argv = ['/usr/local/bin/mxd-train', '--out', {str(out)!r}]\n"
                "from mxd_fast.train.cli import main; sys.exit(main())")
        prog = "mxd-train"
    proc = _python(HIDE_EXTRA + code)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog} needs transformers, tokenizers, safetensors, huggingface_hub, gguf")
    assert lines[0].endswith(INSTALL)
    assert not out.parent.exists()
    # --help needs none of them
    help_proc = _python(HIDE_EXTRA + "import runpy; sys.argv = ['-m', '--help']\n"
                        "runpy.run_module('mxd_fast.train', run_name='__main__', alter_sys=True)")
    assert help_proc.returncode == 0 and "--tokens" in help_proc.stdout, help_proc.stderr


def test_the_library_without_the_train_extra_imports_and_names_the_install_on_use(tmp_path):
    code = HIDE_EXTRA + f"""
import mxd_fast.evaluate, mxd_fast.harvest as H, mxd_fast.train as T
from mxd_fast.evaluate import splice_layer, spliced
from mxd_fast.harvest import ActivationBuffer, TokenStream
layer = T.build_layer("transcoder", 6, 6, 2, 8)
for call in (lambda: T.save_layer(layer, {str(tmp_path / 'run')!r}), lambda: T.load_layer({str(tmp_path)!r}),
             lambda: H.load_model(), lambda: H.load_model("gpt2")):
    try:
        call()
    except ImportError as err:
        assert isinstance(err, T.MissingExtraError), repr(err)
        print(err)
    else:
        raise AssertionError("no ImportError")
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(" needs ")[0] for line in lines] == ["save_layer", "load_layer", "loading a language model",
                                                             "loading a language model"]
    assert all(line.endswith(INSTALL) for line in lines)
    assert "safetensors" in lines[0] and "gguf" in lines[2] and "gguf" not in lines[3]
    assert not (tmp_path / "run").exists()


def test_import_mxd_fast_leaves_the_trainer_and_its_packages_out():
    heavy = ("transformers", "safetensors", "matplotlib", "huggingface_hub", "datasets", "tensorboard", "wandb")
    proc = _python("import sys, mxd_fast\n"
                   "print(sorted(m for m in sys.modules if m.startswith('mxd_fast.train')"
                   f" or m.split('.')[0] in {heavy!r}))\n"
                   "import mxd_fast.harvest, mxd_fast.evaluate, mxd_fast.train, mxd_fast.train.corpus\n"
                   f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "[]"]


# ---- a tiny model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved 2-layer Llama, text files, and the trainer's options for a run of a few steps on them."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from test_distributed import _tiny_model_and_text
    root = tmp_path_factory.mktemp("tiny")
    return root, _tiny_model_and_text(root)


def test_a_run_shows_harvesting_training_and_evaluation_bars_and_explains_its_summary(tiny, tmp_path, capsys):
    from mxd_fast.train import cli
    _, args = tiny
    out = tmp_path / "run"
    assert cli.main([*(a for a in args if a != "--quiet"), "--eval-tokens", "64", "--normalize", "scalar",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "harvesting activations: 100%" in text
    assert "training: 100%" in text and "6/6" in text
    assert "evaluating: 100%" in text and "4/4" in text   # 64 tokens: 4 contexts of 16
    summary = text[text.index("run folder:"):]
    assert summary.count("l0:") == 1 and summary.count("fvu:") == 1
    assert "l0: experts active per token (at most K = 4)" in summary
    assert "fraction of variance unexplained" in summary
    assert json.loads((out / "metrics.json").read_text())["tokens"] == 384
    # a run stopped as asked is a success too
    assert cli.main([*args, "--eval-tokens", "0", "--stop-after", "2", "--out", str(tmp_path / "stopped")]) == 0


def test_the_training_bar_counts_harvesting_in_its_time_estimate():
    """Harvesting pauses the steps every few steps for as long as many steps take: the estimate counts it from
    the first step on (training_eta), not a moving average of the step rate that swings with the pauses."""
    pytest.importorskip("tqdm")
    from mxd_fast.train.progress import progress_bar, training_eta
    assert training_eta(10, 0.5, 800, 0.01) == pytest.approx(5 + 8)   # 10 steps of 0.5 s, 800 rows of 0.01 s
    bar = progress_bar(20, True, desc="training", eta=lambda: 50.0)
    try:
        bar.update(10)
        assert bar.format_dict["rate"] == pytest.approx(10 / 50) and "<00:50" in str(bar)
    finally:
        bar.close()
    bar = progress_bar(20, True)
    try:
        assert bar.smoothing == 0   # without an estimate: the average rate since the start
    finally:
        bar.close()
    assert progress_bar(10, False) is None


def test_the_first_harvest_shown_apart_gives_the_same_batches():
    from mxd_fast.train.data import ActivationBuffer

    class Stream:
        def __init__(self):
            self.next = 0

        def next_contexts(self, n):
            ids = torch.arange(self.next, self.next + 3 * n).view(n, 3)
            self.next += 3 * n
            return ids

    def harvest(ids):
        x = ids.reshape(-1, 1).float()
        return x, -x

    def batches(prepare: bool, seen: list):
        buffer = ActivationBuffer(harvest, Stream(), capacity=20, contexts_per_harvest=2, seed=1)
        if prepare:
            buffer.prepare(32, lambda done, total: seen.append((done, total)))
        return [buffer.next_batch(32)[0] for _ in range(4)]

    seen: list = []
    plain, prepared = batches(False, []), batches(True, seen)
    assert all(torch.equal(a, b) for a, b in zip(plain, prepared))
    assert [d for d, _ in seen] == list(range(6, 37, 6)) and {t for _, t in seen} == {32}


@pytest.mark.parametrize("capacity,b,per_pass,steps", [(20, 8, 6, 30), (64, 5, 12, 50), (16, 32, 4, 7), (10, 3, 1, 40)])
def test_the_rows_a_buffer_will_harvest_are_foreseen(capacity, b, per_pass, steps):
    """ActivationBuffer.rows_to_harvest, which the training's time estimate counts, against what it harvests."""
    from mxd_fast.train.data import ActivationBuffer

    class Stream:
        context = per_pass

        def next_contexts(self, n):
            return torch.zeros(n, per_pass, dtype=torch.int64)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    buffer = ActivationBuffer(lambda ids: (ids.reshape(-1, 1).float(),) * 2, Stream(), capacity=capacity,
                              contexts_per_harvest=1)
    for done in range(steps):
        for ahead in (0, 1, 3, steps - done):
            before = buffer.harvested_tokens
            want = buffer.rows_to_harvest(ahead, b)
            state = buffer.state_dict()
            for _ in range(ahead):
                buffer.next_batch(b)
            assert buffer.harvested_tokens - before == want, (done, ahead)
            buffer.load_state_dict(state)
        buffer.next_batch(b)


# ---- the plot ------------------------------------------------------------------------------------

def test_the_training_plot_is_labelled_and_shows_final_values():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from mxd_fast.train.stats import plot_title, training_figure
    history = [{"tokens": 96 * i, "loss": 0.1 / i, "nmse": 0.9 / i, "dead_fraction": 0.5 / i,
                "fired_in_window": 0.9 - 0.1 / i} for i in range(1, 6)]
    title = plot_title("mxd", 4, 71, 0, "tiny", 480)
    assert title == "MxD (K = 4, 71 experts) replacing the MLP of layer 0 of tiny, 480 training tokens"
    fig = training_figure(history, title, "experts", 1000, 96)
    try:
        assert fig._suptitle.get_text() == title
        loss, nmse, experts = fig.axes
        assert all(ax.get_ylabel() for ax in fig.axes) and all(ax.get_xlabel() == "training tokens" for ax in fig.axes)
        assert "final 0.02" in loss.get_title() and "final 0.18" in nmse.get_title()
        for ax, final in ((loss, "0.02"), (nmse, "0.18"), (experts, "0.100"), (experts, "0.880")):
            assert final in [t.get_text() for t in ax.texts], final   # written at the curve's end
        legend = [t.get_text() for t in experts.get_legend().get_texts()]
        assert legend == ["dead (final 0.100)", "fired in window (final 0.880)"]
        caption = " ".join(t.get_text() for t in fig.texts)
        assert "dead: fraction of the experts that did not fire in the last 1,000 tokens" in caption
        assert "fired in window: fraction of the experts that fired at least once in the logging window" in caption
        assert "logging window of 96 tokens" in caption
    finally:
        plt.close(fig)


# ---- failures ----------------------------------------------------------------------------------

def test_a_failed_start_leaves_no_empty_run_folder(tiny, tmp_path):
    from mxd_fast import train as T
    _, args = tiny
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(SystemExit, match="--context 100 is longer than the model's 64 positions"):
        T.main([*args, "--context", "100", "--out", str(out)])   # after the folder was made
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        T.main([*args, "--context", "100", "--out", str(kept)])
    assert (kept / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        T.main([*args, "--context", "100", "--out", str(empty)])
    assert empty.is_dir()   # it was there before the run


@needs_extra
def test_a_folder_holding_a_run_is_refused_in_the_words_the_makefile_looks_for(tmp_path):
    """`make train` prints how to --overwrite or --resume when the trainer's stderr says the folder "holds a run"."""
    assert 'grep -q "holds a run"' in (REPO / "Makefile").read_text()
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-rank0.pt").write_bytes(b"")   # a stopped run; refused before anything is read
    proc = _trainer(["--out", str(out), "--device", "cpu"])
    assert proc.returncode == 1
    assert f"--out {out} holds a run (checkpoint-rank0.pt): --resume it, choose another --out, or --overwrite it" \
        in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-rank0.pt"]


@pytest.fixture
def unreachable_hub():
    """(URL, connections): a server that closes every connection at once, as a Hub that cannot be reached,
    counting the connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    connections, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            connections.append(1)
            conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    stop.set()
    thread.join()
    server.close()


def _hub_env(url: str, home: Path, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_CACHE"}
    env.update(HF_ENDPOINT=url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _cache_model(home: Path, repo: str, model_dir: Path) -> None:
    """Put a saved model into the Hugging Face cache under `home` as the main revision of Hub model `repo`."""
    cache = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, cache / "snapshots" / commit)


def _with_model(args: list, model: str) -> list:
    i = args.index("--model")
    return [*args[:i + 1], model, *args[i + 2:]]


def test_a_hub_model_the_cache_lacks_fails_after_one_request_when_the_hub_cannot_be_reached(
        tiny, tmp_path, unreachable_hub):
    root, args = tiny
    url, connections = unreachable_hub
    out = tmp_path / "new" / "run"
    proc = _trainer([*_with_model(args, "someone/tiny-model"), "--out", str(out)], env=_hub_env(url, tmp_path / "hf"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("--model someone/tiny-model: not a local folder, and not in the "
                                                   f"Hugging Face cache ({tmp_path / 'hf' / 'hub'})"), proc.stderr
    assert f"the Hub ({url}) cannot be reached" in lines[0] and "hf download someone/tiny-model" in lines[0]
    assert len(connections) == 1   # one request, no retries
    assert not out.parent.exists()
    # HF_HUB_OFFLINE: not even that request
    proc = _trainer([*_with_model(args, "someone/tiny-model"), "--out", str(out)],
                    env=_hub_env(url, tmp_path / "hf", offline=True))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "and HF_HUB_OFFLINE is set" in proc.stderr and len(connections) == 1
    assert not out.parent.exists()


def test_a_cached_hub_model_trains_when_the_hub_cannot_be_reached(tiny, tmp_path, unreachable_hub):
    root, args = tiny
    url, connections = unreachable_hub
    _cache_model(tmp_path / "hf", "someone/tiny-model", root / "model")
    out = tmp_path / "run"
    proc = _trainer([*_with_model(args, "someone/tiny-model"), "--eval-tokens", "0", "--out", str(out)],
                    env=_hub_env(url, tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(connections) == 1   # the one request that found the Hub unreachable; then the cache alone
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "someone/tiny-model"
