"""Steering (python -m mxd_fast.steer): the scores on cases with a known answer, the command line's refusals and
a small run on the embedded model with tiny fresh layers."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import mxd_fast  # noqa: E402
import mxd_fast.steer as entry  # noqa: E402
from mxd_fast.train import atomic_save, save_layer  # noqa: E402
from mxd_fast.train import steer as S  # noqa: E402
from mxd_fast.train.generation import mean_pairwise_cosine  # noqa: E402


def test_importing_the_entry_point_keeps_mxd_fast_steer_steering():
    assert mxd_fast.steer is entry                       # the import bound the module to the function's name
    layer = mxd_fast.MxD(8, 16, 8, 12, 2)
    seen = []
    with mxd_fast.steer(layer, expert=3, scale=5.0):
        with layer.hook_experts.register_forward_hook(lambda module, args, c: seen.append(c)):
            layer(torch.randn(4, 8))
    assert ((seen[0].indices == 3) & (seen[0].values >= 5.0)).any(dim=-1).all()
    with pytest.raises(ValueError, match="expert must satisfy"):
        with mxd_fast.steer(layer, expert=12, scale=1.0):
            pass


# ---- scores with a known answer ----------------------------------------------------------------

def test_coherence_of_identical_generations_is_one():
    v = torch.randn(1, 16).repeat(4, 1)
    assert mean_pairwise_cosine(v) == pytest.approx(1.0, abs=1e-12)
    center = torch.randn(16)
    assert mean_pairwise_cosine(v, center) == pytest.approx(1.0, abs=1e-12)


def test_coherence_is_the_mean_over_distinct_pairs():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = (0.0 + 2 ** -0.5 + 2 ** -0.5) / 3
    assert mean_pairwise_cosine(v) == pytest.approx(expected)
    assert mean_pairwise_cosine(v + 5.0, torch.tensor([5.0, 5.0])) == pytest.approx(expected)   # centred
    with pytest.raises(ValueError, match="at least 2 generations"):
        mean_pairwise_cosine(v[:1])


class _Tokens:
    texts = {1: " A", 2: "b", 3: "a ", 4: " "}

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_concept_rate_matches_stripped_lower_case_text():
    text = S.TokenText(_Tokens())
    concept = S.concept_of([1, 4], text)
    assert concept == {"a"}                                  # the blank token counts for nothing
    assert S.concept_rate(torch.tensor([[1, 2], [3, 1]]), concept, text) == 0.75


def test_choose_experts_most_frequent_first_then_chosen():
    counts = torch.tensor([5, 9, 0, 9, 1, 0])
    assert list(S.choose_experts(counts, 3, [])) == [1, 3, 0]     # ties: the lower id first
    assert S.choose_experts(counts, 10, [2, 3]) == {1: "firing frequency", 3: "firing frequency",
                                                    0: "firing frequency", 4: "firing frequency", 2: "--experts"}
    assert list(S.choose_experts(None, 3, [5])) == [5]


def test_layer_means_typical_coefficient():
    means = S.LayerMeans()
    means.add(torch.tensor([[3.0, 1.0], [5.0, 0.0]]), None)
    means.add(torch.tensor([[1.0, 0.5]]), None)
    assert means.typical_coefficient == pytest.approx(3.0)
    assert means.z_mean is None


def test_mxd_expert_directions_add_up_to_the_layer_output():
    torch.manual_seed(0)
    layer = mxd_fast.MxD(8, 12, 8, 20, 3)
    with torch.no_grad():
        layer.decoder.normal_()
        layer.bias.normal_()
    x = torch.randn(1, 8)
    z, values, indices = layer.encode(x)
    directions = S.expert_directions(layer, indices[0].tolist(), z[0])   # at this token, z_mean = its z
    expected = layer(x)[0] - layer.bias
    torch.testing.assert_close((values[0, :, None] * directions).sum(0), expected, rtol=1e-5, atol=1e-5)
    transcoder = mxd_fast.TopKTranscoder(8, 20, 8, 3)
    torch.testing.assert_close(S.expert_directions(transcoder, [4, 7], None), transcoder.decoder[[4, 7]])


class _TinyLM(nn.Module):
    """A final LayerNorm with a large bias on coordinate 3 and an unembedding reading coordinates."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        with torch.no_grad():
            self.norm.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
        self.head = nn.Linear(4, 6, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([torch.eye(4), -torch.eye(4)[:2]]))

    def get_output_embeddings(self):
        return self.head


def test_promoted_tokens_leave_out_the_norm_bias():
    u = torch.tensor([[3.0, 1.0, 0.0, 0.0]])      # centred: [2, 0, -1, -1]
    model = _TinyLM()
    assert S.promoted_tokens(model, u, 1).tolist() == [[0]]         # not token 3, the bias's
    assert S.promoted_tokens(model, u, 1, lowest=True).tolist() == [[4]]
    assert S.promoted_tokens(model, u.repeat(5, 1), 2, chunk=2).shape == (5, 2)


# ---- the command line's refusals (no model loaded) ---------------------------------------------

def _run_folder(path: Path, layer, layer_index=2, model="embedded:model.gguf", counts=True) -> str:
    save_layer(layer, path, {"model": {"name": model, "layer": layer_index}})
    if counts:
        n = layer.n_experts if isinstance(layer, mxd_fast.MxD) else layer.width
        atomic_save({"firing_counts": torch.arange(n, dtype=torch.int64) % 7}, path / "firing_counts.pt")
    return str(path)


def _tiny_mxd(d=576, n=32, k=4):
    torch.manual_seed(0)
    layer = mxd_fast.MxD(d, 48, d, n, k, activation="silu", glu=True)
    with torch.no_grad():
        layer.decoder.normal_()     # a fresh MxD's decoder is zero: it would output nothing
    return layer


def _tiny_transcoder(d=576, width=40, k=4):
    torch.manual_seed(1)
    return mxd_fast.TopKTranscoder(d, width, d, k)


@pytest.mark.parametrize("argv,message", [
    (["{tmp}/missing"], "RUN_FOLDER .*missing: no run folder"),
    (["{tmp}/empty"], "RUN_FOLDER .*empty: not a run folder"),
    (["{mxd}", "--experts", "32"], "--experts 32: out of range for RUN_FOLDER .*mxd.* 32 experts \\(0 .. 31\\)"),
    (["{mxd}", "{tc}", "--experts", "35"], "--experts 35: out of range for RUN_FOLDER .*mxd"),
    (["{mxd}", "--experts", "1,x"], "--experts: '1,x' is not a comma-separated list"),
    (["{mxd}", "--experts", "-1"], "--experts: '-1': give distinct expert ids >= 0"),
    (["{mxd}", "--scale", "inf"], "--scale must be a finite number or auto, got 'inf'"),
    (["{mxd}", "--scale", "nan"], "--scale must be a finite number or auto, got 'nan'"),
    (["{mxd}", "--scale", "big"], "--scale must be a finite number or auto"),
    (["{mxd}", "{tc5}"], "RUN_FOLDER: .*mxd \\(layer 2\\) and .*tc5 \\(layer 5\\) come from different layers"),
    (["{mxd}", "{other}"], "RUN_FOLDER: .*mxd \\(model the embedded model\\) and .*other \\(model gpt2\\) come from "
                           "different models"),
    (["{mxd}", "--prompts", "The"], "--prompts: give at least 2 prompts"),
    (["{mxd}", "--tokens", "0"], "--tokens must be >= 1"),
    (["{mxd}", "--top", "-1"], "--top must be >= 0"),
    (["{mxd}", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["{mxd}", "--top", "0"], "--top 0 and no --experts"),
    (["{nocounts}"], "RUN_FOLDER .*nocounts has no firing_counts.pt .* pass --experts ids and --top 0"),
    (["{mxd}", "--device", "cuda:7"] if not torch.cuda.is_available() else ["{mxd}", "--device", "nope"],
     "--device"),
])
def test_command_line_refuses_bad_input_by_name(tmp_path, argv, message, capsys):
    (tmp_path / "empty").mkdir()
    names = {"tmp": str(tmp_path), "mxd": _run_folder(tmp_path / "mxd", _tiny_mxd(d=8)),
             "tc": _run_folder(tmp_path / "tc", _tiny_transcoder(d=8)),
             "tc5": _run_folder(tmp_path / "tc5", _tiny_transcoder(d=8), layer_index=5),
             "other": _run_folder(tmp_path / "other", _tiny_transcoder(d=8), model="gpt2"),
             "nocounts": _run_folder(tmp_path / "nocounts", _tiny_mxd(d=8), counts=False)}
    argv = [a.format(**names) for a in argv]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        S.run(argv)
    assert entry.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m mxd_fast.steer: error:")


def test_missing_packages_are_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert entry.main(["somewhere"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m mxd_fast.steer needs matplotlib, not installed: pip install 'mxd_fast[train]'"]


# ---- on the embedded model ---------------------------------------------------------------------



@pytest.fixture
def cached_model(embedded, monkeypatch):
    """run() gets the module's embedded model instead of loading it again."""
    monkeypatch.setattr(S, "load_model", lambda name, device="cpu": embedded)
    return embedded


def test_scale_zero_gives_the_baseline_exactly(embedded):
    model, tokenizer = embedded
    layer = _tiny_mxd().eval()
    prompts = S.prompt_token_ids(tokenizer, ["I think that", "The"])
    for sampling in (S.Sampling(6), S.Sampling(6, temperature=1.0, seed=3)):
        zero = S.steered_generations(model, tokenizer, layer, 2, [0, 5], 0.0, prompts, sampling)
        assert torch.equal(zero[0], zero[None]) and torch.equal(zero[5], zero[None])
        strong = S.steered_generations(model, tokenizer, layer, 2, [0, 5], 200.0, prompts, sampling)
        assert torch.equal(strong[None], zero[None])            # the same baseline, run again
        assert not (torch.equal(strong[0], zero[None]) and torch.equal(strong[5], zero[None]))   # steering acts
    assert S.special_token_ids(tokenizer)
    assert not set(zero[None].reshape(-1).tolist()) & set(S.special_token_ids(tokenizer))


def test_batched_generation_equals_one_prompt_at_a_time(embedded):
    model, tokenizer = embedded
    prompts = S.prompt_token_ids(tokenizer, ["In my opinion, the best", "The"])
    together = S.generate(model, prompts, 6, pad_id=tokenizer.pad_token_id)
    for i, p in enumerate(prompts):
        assert torch.equal(S.generate(model, [p], 6), together[i:i + 1])


def test_fluency_is_the_model_loss_of_the_generated_tokens(embedded):
    model, tokenizer = embedded
    prompts = S.prompt_token_ids(tokenizer, ["I think that", "Here is a longer prompt than that"])
    generated = S.generate(model, prompts, 5)
    losses, pooled = S.score_generations(model, prompts, generated, tokenizer.pad_token_id)
    for i, p in enumerate(prompts):
        ids = torch.tensor([p + generated[i].tolist()])
        labels = ids.clone()
        labels[0, :len(p)] = -100                              # only the generated tokens are scored
        assert float(losses[i]) == pytest.approx(float(model(input_ids=ids, labels=labels).loss), rel=1e-4)
    same = S.score(model, [prompts[0]] * 3, generated[:1].repeat(3, 1), torch.zeros(pooled.shape[1]), 0)
    assert same.coherence == pytest.approx(1.0, abs=1e-6)      # identical generations


def test_end_to_end_on_the_embedded_model(cached_model, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    mxd_run = _run_folder(tmp_path / "mxd", _tiny_mxd())
    tc_run = _run_folder(tmp_path / "tc", _tiny_transcoder())
    report = S.run([mxd_run, tc_run, "--top", "2", "--experts", "3", "--tokens", "4", "--prompts", "The", "I think",
                    "--text", str(text), "--eval-tokens", "128"])
    out = Path(mxd_run) / "steer"
    assert json.loads((out / S.TABLE_JSON).read_text()) == json.loads(json.dumps(report))
    assert (out / S.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generations = json.loads((out / S.GENERATIONS_JSON).read_text())
    table = (out / S.TABLE_MD).read_text()
    assert "## Summary" in table
    assert [r["arch"] for r in report["runs"]] == ["mxd", "transcoder"]
    for record in report["runs"]:
        experts = [e["expert"] for e in record["experts"]]
        assert experts == [6, 13, 3]                           # the two most frequent (count 6), then --experts
        assert [e["chosen_by"] for e in record["experts"]] == ["firing frequency"] * 2 + ["--experts"]
        assert record["scale"] == pytest.approx(S.SCALE_MULTIPLE * record["typical_coefficient"])
        counts = torch.arange(record["size"]) % 7               # the fake firing_counts.pt; no metrics.json:
        trained = int(counts.sum()) // 4                         # the tokens are the counts over k
        assert record["experts"][0]["firing_frequency"] == pytest.approx(6 / trained)
        runs = generations["runs"][record["folder"]]
        assert len(runs["baseline"]) == 2 and set(runs["experts"]) == {"6", "13", "3"}
        for e in record["experts"]:
            assert len(e["top_tokens"]) == S.DEFAULT_TOP_TOKENS
            assert e["fluency_change"] == pytest.approx(e["fluency"] - record["baseline"]["fluency"])
            assert 0.0 <= e["concept_rate"] <= 1.0 and -1.0 <= e["coherence"] <= 1.0
            assert re.search(rf"\| {e['expert']} \|", table)


def test_a_layer_of_another_width_is_refused_by_name(cached_model, tmp_path):
    wide = _run_folder(tmp_path / "wide", _tiny_mxd(d=8))
    with pytest.raises(ValueError, match="RUN_FOLDER .*wide: the layer takes inputs of width 8, the model's blocks "
                                         "are 576 wide"):
        S.run([wide, "--top", "1"])
