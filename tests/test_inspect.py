"""The layer report (python -m mxd_fast.inspect): the streaming top contexts against a dense computation, the
page's pieces, the command line's refusals, and a report of a tiny layer on the embedded model opened in a real
browser (headless Chromium, Debian's `chromium` package)."""
from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import mxd_fast  # noqa: E402
import mxd_fast.inspect as entry  # noqa: E402
from mxd_fast.train import atomic_save, save_layer  # noqa: E402
from mxd_fast.train import report as R  # noqa: E402
from mxd_fast.train.report_page import script_json  # noqa: E402
from mxd_fast.train.top_contexts import TopContexts  # noqa: E402

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


# ---- top contexts ------------------------------------------------------------------------------

def _random_batches(n_experts=11, k=3, contexts=3, length=9, batches=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        tokens = torch.randint(0, 100, (contexts, length), generator=g)
        logits = torch.randn(contexts * length, n_experts, generator=g)
        values, indices = logits.relu().topk(k, dim=-1)
        out.append((tokens, values, indices))
    return out


def test_top_contexts_equal_the_dense_computation():
    n, keep, before, after = 11, 3, 2, 1
    batches = _random_batches(n)
    top = TopContexts(n, keep, before, after, chunk=4)
    for tokens, values, indices in batches:
        top.update(tokens, values, indices)
    # dense reference: every token's coefficient of every expert, in the order the batches came
    dense = torch.cat([torch.zeros(v.shape[0], n).scatter(1, i, v) for _, v, i in batches])
    all_tokens = torch.cat([t for t, _, _ in batches])            # [contexts, length]
    length = all_tokens.shape[1]
    assert torch.equal(top.fired, (dense > 0).sum(0))
    torch.testing.assert_close(top.coef_sum, dense.double().sum(0))
    assert top.seen == dense.shape[0]
    for e in range(n):
        column = dense[:, e]
        expected = sorted(((float(v), row) for row, v in enumerate(column.tolist()) if v > 0), key=lambda p: -p[0])
        got = top.contexts(e)
        assert [v for v, *_ in got] == pytest.approx([v for v, _ in expected[:keep]])
        for (value, toks, coefs, at), (_, row) in zip(got, expected):
            context, position = divmod(row, length)
            lo, hi = max(0, position - before), min(length, position + after + 1)
            assert toks == all_tokens[context, lo:hi].tolist()
            assert coefs == pytest.approx(dense[context * length + lo:context * length + hi, e].tolist())
            assert at == position - lo and coefs[at] == pytest.approx(value)


def test_an_expert_that_never_fires_has_no_context():
    top = TopContexts(4, keep=2)
    top.update(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1.0], [2.0], [0.5]]), torch.tensor([[1], [1], [2]]))
    assert top.contexts(0) == [] and top.fired.tolist() == [0, 2, 1, 0]
    assert [c[0] for c in top.contexts(1)] == [2.0, 1.0]


# ---- the page's pieces -------------------------------------------------------------------------

def test_script_json_cannot_close_its_script_element():
    text = script_json({"t": "</script><b>&"})
    assert "</" not in text and "<" not in text and json.loads(text) == {"t": "</script><b>&"}


def test_histogram_counts_the_experts_that_fired():
    svg = R.histogram_svg(torch.tensor([0.0, 1e-3, 2e-3, 0.1, 0.5]), bins=4)
    titles = [int(t) for t in re.findall(r"<title>(\d+) experts</title>", svg)]
    assert sum(titles) == 4 and len(titles) == 4
    assert "1e-3" in svg and "1e0" in svg
    assert "no expert fired" in R.histogram_svg(torch.zeros(3))


# ---- the command line's refusals ---------------------------------------------------------------

def _run_folder(path: Path, layer, layer_index=6) -> str:
    save_layer(layer, path, {"model": {"name": "embedded:model.gguf", "layer": layer_index}})
    n = layer.n_experts if isinstance(layer, mxd_fast.MxD) else layer.width
    counts = torch.arange(n, dtype=torch.int64) % 5
    atomic_save({"firing_counts": counts}, path / "firing_counts.pt")
    (path / "metrics.json").write_text(json.dumps({"tokens": 1000}))
    return str(path)


def _tiny_mxd(d=576):
    torch.manual_seed(0)
    layer = mxd_fast.MxD(d, 48, d, 24, 4, activation="silu", glu=True)
    with torch.no_grad():
        layer.decoder.normal_()
    return layer


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/missing"], "RUN_FOLDER .*missing: no run folder"),
    (["{tmp}/empty"], "RUN_FOLDER .*empty: not a run folder"),
    (["{mxd}", "--experts", "24"], "--experts 24: out of range for RUN_FOLDER .*24 experts \\(0 .. 23\\)"),
    (["{mxd}", "--scale", "inf"], "--scale must be a finite number or auto"),
    (["{mxd}", "--contexts", "0"], "--contexts must be >= 1"),
    (["{mxd}", "--before", "-1"], "--before must be >= 0"),
    (["{mxd}", "--prompts", " "], "--prompts: a prompt is blank"),
])
def test_command_line_refuses_bad_input_by_name(tmp_path, argv, message, capsys):
    (tmp_path / "empty").mkdir()
    names = {"tmp": str(tmp_path), "mxd": _run_folder(tmp_path / "mxd", _tiny_mxd(d=8))}
    argv = [a.format(**names) for a in argv]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        R.run(argv)
    assert entry.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m mxd_fast.inspect: error:")


def test_missing_packages_are_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    assert entry.main(["somewhere"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m mxd_fast.inspect needs gguf, not installed: pip install 'mxd_fast[train]'"]


# ---- a report on the embedded model, in a browser ----------------------------------------------



def _write_report(embedded, folder: Path, layer, options: list) -> tuple:
    """(page path, page text, page data) of a report of `layer` at block 6 of the embedded model."""
    text = folder / "held.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Python reads the file <tag> & more.\n" * 30)
    run = _run_folder(folder / "run", layer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(R, "load_model", lambda name, device="cpu": embedded)   # the module's model, not loaded again
        path = R.run([run, "--text", str(text), "--eval-tokens", "512", "--tokens", "4", "--contexts", "3", *options])
    page = path.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                                re.S).group(1))
    return path, page, data


@pytest.fixture(scope="module")
def report(embedded, tmp_path_factory):
    """(page path, page text, page data) of a report of a tiny MxD at block 6 of the embedded model."""
    return _write_report(embedded, tmp_path_factory.mktemp("inspect"), _tiny_mxd(),
                         ["--steer-top", "2", "--experts", "7"])


def test_report_holds_every_expert(report):
    path, page, data = report
    assert path.name == "index.html" and path.parent.name == "report"
    assert [e["id"] for e in data["experts"]] == list(range(24))
    assert data["frequency_source"] == "training, 1000 tokens"
    counts = torch.arange(24) % 5
    dead = [n for n in range(24) if counts[n] == 0]
    assert f"Dead experts: {len(dead)}</h2>" in page and ", ".join(map(str, dead)) in page
    for e in data["experts"]:
        assert e["freq"] == pytest.approx(int(counts[e["id"]]) / 1000)
        assert len(e["promoted"]) == 8 and len(e["suppressed"]) == 8 and len(e["contexts"]) <= 3
        for c in e["contexts"]:
            assert len(c["tokens"]) == len(c["coefs"]) and c["coefs"][c["at"]] == pytest.approx(c["value"], rel=1e-3)
    steered = {e["id"] for e in data["experts"] if e["steered"]}
    assert steered == {4, 9, 7}                  # the two most frequent (count 4: ids 4, 9, 14, 19), and --experts
    assert all(len(e["steered"]) == 2 for e in data["experts"] if e["steered"])


def test_report_loads_nothing_from_the_network(report):
    _, page, _ = report
    assert not re.search(r"<(script|link|img|iframe)[^>]*(src|href)=", page)
    assert "http" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", page)


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium binary (chromium, chromium-browser, google-chrome) on PATH: apt-get install chromium")


def _dump_dom(url: str, tmp_path: Path) -> tuple[str, str]:
    """(the DOM after the page's script ran, Chromium's log) of headless Chromium at `url`."""
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=3000", "--dump-dom", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def _console_errors(log: str) -> list:
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_browser_shows_an_expert_s_contexts(report, tmp_path):
    path, _, data = report
    expert = next(e for e in data["experts"] if len(e["contexts"]) == 3)
    dom, log = _dump_dom(f"{path.resolve().as_uri()}#expert={expert['id']}", tmp_path)
    status = re.search(r'<span id="status">(.*?)</span>', dom).group(1)
    assert status == f"ready: expert {expert['id']} (3 contexts)", status
    assert re.search(r'<pre id="errors" hidden=""></pre>', dom), "the page reported errors"
    assert _console_errors(log) == []
    shown = re.search(r'<div class="contexts" id="contexts">(.*?)</div></section>', dom, re.S).group(1)
    assert shown.count('class="context"') == 3
    first = expert["contexts"][0]
    top_token = data["tokens"][first["tokens"][first["at"]]].replace("\n", "\u21b5")
    assert '<span class="tok top" title="coefficient' in shown
    assert html.escape(top_token, quote=False) in shown
    assert f"Expert {expert['id']}</h2>" in dom


def test_browser_search_by_token_lists_experts(report, tmp_path):
    path, _, data = report
    token = next(data["tokens"][t] for e in data["experts"] for t in e["promoted"]
                 if data["tokens"][t].strip().isalpha())
    query = token.strip().lower()
    dom, log = _dump_dom(f"{path.resolve().as_uri()}#q={query}", tmp_path)
    status = re.search(r'<span id="status">(.*?)</span>', dom).group(1)
    found = int(re.search(r"(\d+) found", status).group(1))
    assert status.startswith("ready: search") and found >= 1
    assert re.search(r'<pre id="errors" hidden=""></pre>', dom) and _console_errors(log) == []
    assert dom.count('<tr class="row">') == min(found, 200)


def test_browser_reports_a_script_error_in_the_page(report, tmp_path):
    """The error channel the tests rely on works: a page whose data is broken says so in #errors."""
    path, page, _ = report
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace('"experts":[', '"experts":7,"x":[', 1), encoding="utf-8")
    dom, log = _dump_dom(f"{broken.resolve().as_uri()}#expert=1", tmp_path)
    assert re.search(r'<span id="status">error</span>', dom)
    assert re.search(r'<pre id="errors">error: [^<]+</pre>', dom)
    assert _console_errors(log), "Chromium's log shows no console error: the console check could not fail"


def test_a_transcoder_report_reads_its_latents(embedded, tmp_path):
    from mxd_fast.train.steer import TokenText, promoted_tokens
    model, tokenizer = embedded
    torch.manual_seed(1)
    layer = mxd_fast.TopKTranscoder(576, 20, 576, 4)
    path, page, data = _write_report(embedded, tmp_path, layer, ["--steer-top", "0"])
    assert data["arch"] == "transcoder" and [e["id"] for e in data["experts"]] == list(range(20))
    text = TokenText(tokenizer)
    expected = promoted_tokens(model, layer.decoder, 8)          # a latent writes its decoder row
    for e in data["experts"]:
        assert [data["tokens"][t] for t in e["promoted"]] == [text(t) for t in expected[e["id"]].tolist()]
        assert e["steered"] is None
    assert 'Unsteered generations</h2><p class="muted">none generated</p>' in page
    latent = next(e["id"] for e in data["experts"] if e["contexts"])
    dom, log = _dump_dom(f"{path.resolve().as_uri()}#expert={latent}", tmp_path)
    assert f"Latent {latent}</h2>" in dom and re.search(r'<span id="status">ready: expert', dom)
    assert re.search(r'<pre id="errors" hidden=""></pre>', dom) and _console_errors(log) == []
