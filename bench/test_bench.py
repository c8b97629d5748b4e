"""The benchmark cases as pytest-benchmark tests, plus checks of the suite's own wiring.

`pytest bench --benchmark-disable` runs every case once on a tiny shape (a smoke test);
`pytest bench` times them; `MXD_BENCH_SHAPES=gpt2:T=512,sweep-k pytest bench -k gather` times real
shapes (any spec `python -m bench --shapes` accepts). The device is CUDA when present, else CPU;
Triton runs on CPU only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from bench import cases as C
from mxd_fast.specs import SPECS, assert_close
from bench import cli, report
from bench import shapes as S
from bench import timing as T

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
SHAPE_SPECS = S.split_specs(os.environ.get("MXD_BENCH_SHAPES", "tiny"))


def _shapes():
    return S.resolve(SHAPE_SPECS, DEVICE.type)


def _params():
    for s in _shapes():
        for op in C.OPS:
            for mode in C.modes_for(op):
                for provider in C.all_providers(op):
                    yield pytest.param(op, mode, provider, s, id=f"{op}-{mode}-{provider}-{s.name}")


def _skip_unavailable(provider: str) -> None:
    reason = C.provider_unavailable(provider, DEVICE)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("op,mode,provider,shape", list(_params()))
def test_case(benchmark, op, mode, provider, shape):
    _skip_unavailable(provider)
    case = C.make_case(op, mode, provider, shape, torch.float32, DEVICE)
    if case.estimated_memory(1) > cli.MEMORY_FRACTION * T.free_memory(DEVICE):
        pytest.skip("estimated memory exceeds the free memory")
    fn, inputs = case.build(copies=2)
    rotation = itertools.cycle(inputs)
    benchmark.extra_info.update(flops=case.flops, bytes=case.bytes, device=str(DEVICE), shape=shape.dims())

    def call():
        out = fn(next(rotation))
        T.sync(DEVICE)
        return out

    if not benchmark.disabled:
        call()      # a warm-up call: compilation, autotuning and the allocator's first growth stay out of the timing
    out = benchmark(call)
    flat = out if isinstance(out, (tuple, list)) else (out,)
    for t in flat:
        assert torch.isfinite(t).all()


# ---- the cases compute what they claim ------------------------------------------------------------

CHECK_DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32


def _outputs(op, mode, provider, shape):
    case = C.make_case(op, mode, provider, shape, CHECK_DTYPE, DEVICE)
    fn, inputs = case.build(copies=1)
    out = fn(inputs[0])
    return out if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("op", C.OPS[:3])
@pytest.mark.parametrize("mode", C.OP_MODES)
def test_providers_agree_with_reference(op, mode):
    """Every provider's output (and gradients) within the op spec's tolerance of the reference's."""
    shape = S.NAMED["tiny"]
    tolerance = SPECS[op].tolerances[CHECK_DTYPE]
    expected = _outputs(op, mode, "reference", shape)
    for provider in C.all_providers(op)[1:]:
        if C.provider_unavailable(provider, DEVICE) is not None or provider in C.PARTIAL_PROVIDERS:
            continue
        got = _outputs(op, mode, provider, shape)
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.dtype == e.dtype
            assert_close(g, e, tolerance, f"{op} {mode} {provider} output {i}")


@pytest.mark.parametrize("mode", C.OP_MODES)
def test_gemm_provider_is_the_decoder_product(mode):
    shape = S.NAMED["tiny"]
    case = C.make_case("mxd_decode", mode, "gemm", shape, torch.float32, DEVICE)
    fn, inputs = case.build(copies=1)
    i = inputs[0]
    out = fn(i)
    z, dec = i["z"].detach().requires_grad_(), i["decoder"].detach().requires_grad_()
    y = z @ dec
    if mode == "fwd":
        torch.testing.assert_close(out, y)
    else:
        want = torch.autograd.grad(y, [z, dec], i["grad_out"])
        assert len(out) == 2 and all(torch.allclose(a, b) for a, b in zip(out, want))
    assert case.flops == (1 if mode == "fwd" else 3) * 2 * shape.T * shape.H * shape.d


GATHER_BASELINES = ("embedding_bag", "sparsify")
# 33 selections of 6 rows, and of 400 (most rows unselected)
GATHER_SHAPES = {"dense": S.Shape("dense", d=9, H=4, N=6, K=3, T=11),
                 "sparse": S.Shape("sparse", d=9, H=4, N=400, K=3, T=11)}


@pytest.mark.parametrize("shape", GATHER_SHAPES)
@pytest.mark.parametrize("provider", (*GATHER_BASELINES, "torch"))
@pytest.mark.parametrize("mode", C.OP_MODES)
def test_gather_combine_baselines_compute_the_op(provider, mode, shape):
    """The embedding-bag baselines (and the torch backend beside them) time the whole op: y and its
    gradients in weight and values, within the spec's tolerance of the reference (on inputs where tokens
    repeat experts and rows go unselected)."""
    _skip_unavailable(provider)
    assert provider in C.all_providers("gather_combine") and provider not in C.PARTIAL_PROVIDERS + C.DENSE_PROVIDERS
    case = C.make_case("gather_combine", mode, provider, GATHER_SHAPES[shape], CHECK_DTYPE, DEVICE)
    fn, inputs = case.build(copies=1)
    i = inputs[0]
    i["indices"][:, 1] = i["indices"][:, 0]                   # a token selects a row twice
    i["indices"][i["indices"] == 5] = 4                       # row 5 goes unselected
    with torch.no_grad():
        i["values"][:, 2] *= -1                               # signed values
    got = fn(i)
    got = got if isinstance(got, (tuple, list)) else (got,)
    weight, values = i["weight"].detach().requires_grad_(), i["values"].detach().requires_grad_()
    y = SPECS["gather_combine"].reference(weight, values, i["indices"])
    want = (y,) if mode == "fwd" else torch.autograd.grad(y, [weight, values], i["grad_out"])
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, SPECS["gather_combine"].tolerances[CHECK_DTYPE], f"{provider} {mode} output {k}")


@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_torch_gather_combine_is_reproducible(shape):
    """The torch provider's forward + backward is bitwise reproducible in float32."""
    fn, inputs = C.make_case("gather_combine", "fwd+bwd", "torch", GATHER_SHAPES[shape], torch.float32,
                             DEVICE).build(copies=1)
    first, second = fn(inputs[0]), fn(inputs[0])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_sparsify_provider_needs_sparsify(monkeypatch):
    real = C.importlib.util.find_spec
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda name, *a: None if name == "sparsify" else real(name, *a))
    assert "sparsify is not installed" in C.provider_unavailable("sparsify", torch.device("cpu"))
    assert C.provider_unavailable("embedding_bag", torch.device("cpu")) is None
    run, missing = cli.providers_for("gather_combine", torch.device("cpu"), ["torch", "sparsify"])
    assert run == ["torch"] and "sparsify is not installed" in missing["sparsify"]


def test_train_step_learns():
    shape = S.NAMED["tiny"]
    for provider in C.all_providers("train"):
        if C.provider_unavailable(provider, DEVICE) is not None:
            continue
        fn, inputs = C.make_case("train", "step", provider, shape, torch.float32, DEVICE).build(copies=1)
        losses = [float(fn(inputs[0])) for _ in range(5)]
        assert losses[-1] < losses[0], (provider, losses)


def test_random_selection_distinct():
    gen = torch.Generator().manual_seed(0)
    values, indices = C.random_selection(50, 40, 40, torch.float32, torch.device("cpu"), gen)
    assert (indices.sort(dim=1).values == torch.arange(40)).all()
    assert (values > 0).all() and (values[:, :-1] >= values[:, 1:]).all()
    _, indices = C.random_selection(64, 1000, 7, torch.float32, torch.device("cpu"), gen)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all() and int(indices.max()) < 1000


# ---- FLOPs, shapes, CLI -------------------------------------------------------------------------

def test_flops_definitions():
    s = S.PAPER["pythia-1.4b"]
    gate = C.make_case("topk_gate", "fwd", "torch", s, torch.float32, torch.device("cpu"))
    assert gate.flops == 2 * 4096 * 2048 * 57330            # 0.96 TFLOP
    for name, shape in S.PAPER.items():
        dense = C.make_case("train", "step", "reference", shape, torch.float32, torch.device("cpu")).flops
        sparse = C.make_case("train", "step", "torch", shape, torch.float32, torch.device("cpu")).flops
        assert 3.0 < dense / sparse < 4.0, name
    sparse_gc = C.make_case("gather_combine", "fwd+bwd", "torch", s, torch.float32, torch.device("cpu"))
    dense_gc = C.make_case("gather_combine", "fwd+bwd", "reference", s, torch.float32, torch.device("cpu"))
    assert dense_gc.flops / sparse_gc.flops == s.N / s.K
    assert sparse_gc.bytes == dense_gc.bytes
    # training: bytes for the mxd_fast providers only, at least the gate's (less its dx: x is frozen) and
    # the decode's; the step adds AdamW
    cpu = torch.device("cpu")
    train = {m: C.make_case("train", m, "cuda", s, torch.bfloat16, cpu).bytes for m in ("fwd+bwd", "step")}
    ops = sum(C.make_case(op, "fwd+bwd", "cuda", s, torch.bfloat16, cpu).bytes for op in ("topk_gate", "mxd_decode"))
    ops -= 2 * (s.T * s.K * s.d + s.T * s.d)
    assert ops < train["fwd+bwd"] < 1.2 * ops
    assert train["step"] - train["fwd+bwd"] >= 7 * 2 * C.parameter_count("cuda", s)
    assert C.make_case("train", "step", "reference", s, torch.float32, cpu).bytes is None


def test_shape_specs():
    assert S.parse_shape("gpt2").N == 21490
    s = S.parse_shape("gpt2:T=2048,K=64")
    assert (s.T, s.K, s.N, s.d) == (2048, 64, 21490, 768)
    assert S.parse_shape("gpt2:d=512").N == S.budget_experts(512, 3072)
    assert [x.K for x in S.sweep("K", S.PAPER["gpt2"])] == list(S.SWEEP_K)
    assert {x.sweep for x in S.resolve(["sweep-n@small"], "cpu")} == {"N"}
    with pytest.raises(ValueError, match="bad shape override 'Q=3'"):
        S.parse_shape("gpt2:Q=3")
    with pytest.raises(ValueError, match="unknown shape 'nope'"):
        S.parse_shape("nope")
    assert S.split_specs("pythia-1.4b:T=8192,K=128,sweep-k@gpt2:T=512,N=4096,paper, tiny") == [
        "pythia-1.4b:T=8192,K=128", "sweep-k@gpt2:T=512,N=4096", "paper", "tiny"]
    assert [s.label() for s in S.resolve(S.split_specs("gpt2:T=64,K=8,tiny"), "cpu")] == [
        S.parse_shape("gpt2:T=64,K=8").label(), S.NAMED["tiny"].label()]


def test_cli_keeps_what_it_measured_when_cut_off(tmp_path, monkeypatch):
    groups = []
    real = cli.run_group

    def cut_off_after_one(*a, **kw):
        if groups:
            raise KeyboardInterrupt   # what a time limit's signal amounts to
        groups.append(real(*a, **kw))
        return groups[-1]

    monkeypatch.setattr(cli, "run_group", cut_off_after_one)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--quick", "--device", "cpu", "--shapes", "tiny", "--ops", "gather_combine", "--out", str(tmp_path),
                  "--reps", "2", "--no-plot"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["partial"] and len(data["rows"]) == len(groups[0]) > 0


def test_targets_summary():
    def row(op, mode, provider, median, frac=None, copy=None):
        return {"op": op, "mode": mode, "shape": "s", "provider": provider, "median": median, "frac_matmul": frac,
                "frac_copy": copy}
    rows = [row("topk_gate", "fwd", "gemm+topk", 3.0), row("topk_gate", "fwd", "triton", 2.0),
            row("mxd_decode", "fwd", "gemm", 1.0, 0.9), row("mxd_decode", "fwd", "cuda", 1.5, 0.5, 0.8),
            row("mxd_decode", "fwd", "triton", 2.0, 0.3, 0.65),
            row("train", "fwd+bwd", "reference", 8.0), row("train", "fwd+bwd", "cuda", 2.0, 0.25)]
    text = report.targets(rows)
    assert "topk_gate fwd s: speedup over addmm + relu + torch.topk (target >= 1.3): triton 1.50\n" in text
    # floors: cuda max(0.5, 0.8) * 1.5 = 1.2, triton 0.65 * 2 = 1.3; the least over the GEMM's floor 0.9
    assert "mxd_decode fwd s: time / the z @ decoder GEMM alone (target <= 1.15): cuda 1.50, triton 2.00; " \
           "at the ceilings 1.33" in text
    assert "train fwd+bwd s: speedup of forward + backward over the dense reference (target >= 4): cuda 4.00 " \
           "(25% of the matmul ceiling); at the ceilings 16.00" in text


def test_training_summary_has_a_line_per_mode():
    rows = [{"op": "train", "mode": m, "shape": "s", "provider": p, "median": t, "dtype": "bf16",
             "speedup_vs_reference": r}
            for m, p, t, r in (("fwd+bwd", "reference", 8.0, 1.0), ("fwd+bwd", "cuda", 2.0, 4.0),
                               ("step", "reference", 9.0, 1.0), ("step", "cuda", 3.0, 3.0))]
    assert report.summary(rows).splitlines() == [
        "training forward + backward s, bf16: reference 8000 ms; cuda 2000 ms (4.00x)",
        "training step s, bf16: reference 9000 ms; cuda 3000 ms (3.00x)"]


def test_legend_keeps_the_dirty_mark():
    assert report._commit("0123456789abcdef0123-dirty") == "0123456789ab-dirty"
    assert report._commit("0123456789abcdef0123") == "0123456789ab"


def test_default_suites():
    cpu = cli.default_jobs("cpu", quick=False)
    train = [j for j in cpu if j.op == "train"]
    assert any(j.shape.d == 768 and j.shape.T == 2048 for j in train)
    gpu = cli.default_jobs("cuda", quick=False)
    assert {j.shape.name for j in gpu if j.op == "train"} == set(S.PAPER)
    assert {j.shape.sweep for j in gpu} >= {"K", "N", "T"}


def test_cli_writes_results(tmp_path, capsys):
    rc = cli.main(["--quick", "--device", "cpu", "--shapes", "tiny", "--ops", "gather_combine,mxd_decode,train",
                   "--out", str(tmp_path), "--reps", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gather_combine" in printed and ("plot written" in printed or "matplotlib" in printed)
    data = json.loads((tmp_path / "results.json").read_text())
    assert "partial" not in data["meta"]
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"gather_combine", "mxd_decode", "train"}
    partial = [r for r in rows if r["provider"] in C.PARTIAL_PROVIDERS]
    assert partial and all(r["speedup_vs_reference"] is None for r in partial)   # a part of the op only
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("op", "provider", "shape", "mode", "dtype", "median", "p20", "p80", "memory", "device",
                    "versions", "git_commit", "date"):
            assert r[key] is not None, key
        assert r["p20"] <= r["median"] <= r["p80"]
    ref = [r for r in rows if r["provider"] == "reference"]
    assert all(r["speedup_vs_reference"] == 1.0 for r in ref)
    assert (tmp_path / "table.txt").exists()
    assert data["meta"]["ceilings"]["matmul_flops"] > 0


def test_memory_skip(monkeypatch):
    monkeypatch.setattr(T, "free_memory", lambda device: 1 << 20)
    case = C.make_case("topk_gate", "fwd", "reference", S.PAPER["gpt2"], torch.float32, torch.device("cpu"))
    row = cli.run_case(case, T.TimingConfig(), T.Ceilings(1e12, 1, 1e11, 1), 1 << 20)
    assert row["status"] == "skipped" and "skipped" in row["note"]


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert "matplotlib" in report.plot(str(tmp_path / "x.png"), [])


def test_peak_memory_sees_a_large_allocation():
    if DEVICE.type == "cuda":
        fn = lambda _: torch.empty(64 << 20, dtype=torch.uint8, device=DEVICE).fill_(1)  # noqa: E731
    else:
        fn = lambda _: torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # noqa: E731
    mem, method = T.peak_memory(fn, None, DEVICE)
    assert method != "unavailable"
    assert mem >= 60 << 20


def test_quantile():
    assert T.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert T.quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)


def test_time_interleaved_reports_failures():
    calls = []

    def good(x):
        calls.append(("good", x))
        return x

    def bad(x):
        raise RuntimeError("boom")

    cfg = T.TimingConfig(warmup_calls=1, min_reps=4, max_reps=4, target_time=0.0)
    timings = T.time_interleaved([good, bad, good], [1, 2], cfg)
    assert isinstance(timings[1], RuntimeError)
    assert timings[0].reps == timings[2].reps == 4
    assert [x for _, x in calls[2:6]] == [1, 1, 2, 2]      # turns: A C A C on the same input


def test_group_shares_inputs_and_interleaves():
    shape = S.NAMED["tiny"]
    cases = [C.make_case("gather_combine", "fwd", p, shape, torch.float32, torch.device("cpu"))
             for p in ("reference", "torch")]
    rows = cli.run_group(cases, T.TimingConfig(warmup_calls=1, min_reps=2, max_reps=2, target_time=0.0),
                         T.Ceilings(1e12, 1, 1e11, 1), 1 << 20)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["interleaved"] and r["reps"] == 2 for r in rows)
    assert rows[0]["speedup_vs_reference"] == 1.0 and rows[1]["speedup_vs_reference"] > 0


def test_cli_rejects_unknown_names():
    for argv, message in ((["--ops", "nope"], "unknown op 'nope'"), (["--providers", "nope"], "unknown provider"),
                          (["--modes", "nope"], "unknown mode"), (["--shapes", "nope"], "--shapes"),
                          (["--shapes", "tiny:K=0"], "--shapes: .*K must satisfy")):
        with pytest.raises(SystemExit, match=message):
            cli.main(["--device", "cpu", "--quick", *argv])


def _cli_exit_message(argv, capsys) -> str:
    """What cli.main exits with: its SystemExit message, or argparse's error on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    code = exit_info.value.code
    return code if isinstance(code, str) else capsys.readouterr().err


def test_cli_rejects_bad_numbers(tmp_path, capsys):
    too_many_threads = str(len(os.sched_getaffinity(0)) + 1)
    for argv, message in ((["--reps", "-1"], "argument --reps: expected an integer >= 1"),
                          (["--reps", "0"], "argument --reps: expected an integer >= 1"),
                          (["--reps", "two"], "argument --reps: expected an integer, got 'two'"),
                          (["--threads", "-1"], "argument --threads: expected an integer >= 1"),
                          (["--threads", "0"], "argument --threads: expected an integer >= 1"),
                          (["--threads", too_many_threads], f"--threads {too_many_threads}: this process may use")):
        out = tmp_path / argv[0].strip("-") / argv[1]
        message_got = _cli_exit_message(["--quick", "--device", "cpu", "--shapes", "tiny", "--ops", "gather_combine",
                                         "--modes", "fwd", "--out", str(out), "--no-plot", *argv], capsys)
        assert message in message_got, argv
        assert not out.exists(), argv


def test_cli_rejects_unusable_devices(tmp_path, capsys):
    for device, message in (("bogus", "--device 'bogus': the benchmarks run on cpu or cuda[:i]; available here: cpu"),
                            ("meta", "--device 'meta': the benchmarks run on cpu or cuda"),
                            ("cpu:1", "--device 'cpu:1': the benchmarks run on cpu or cuda"),
                            ("", "--device '': the benchmarks run on cpu or cuda"),
                            ("cuda:99", "--device cuda:99: no ")):
        got = _cli_exit_message(["--quick", "--device", device, "--shapes", "tiny", "--ops", "gather_combine",
                                 "--out", str(tmp_path), "--no-plot"], capsys)
        assert message in got, device
    assert not (tmp_path / "results.json").exists()


def test_cli_exits_when_a_selection_selects_nothing(tmp_path, capsys):
    for argv, message in (
            (["--ops", "topk_gate", "--modes", "step"],
             "--modes step selects nothing: the cases of --ops topk_gate in the default suite have modes fwd, fwd+bwd; "
             "step is a mode of train"),
            (["--ops", "topk_gate", "--modes", "fwd,step", "--shapes", "tiny"],
             "--modes step selects nothing: the cases of --ops topk_gate have modes fwd, fwd+bwd"),
            (["--ops", "train", "--modes", "fwd+bwd"],
             "--modes fwd+bwd selects nothing: the cases of --ops train in the default suite have modes step; "
             "fwd+bwd is a mode of topk_gate, gather_combine, mxd_decode, train (with --shapes an op runs every mode"),
            (["--ops", "topk_gate", "--providers", "mlp", "--shapes", "tiny"],
             "--providers mlp selects nothing: the selected ops (topk_gate) have providers reference, gemm+topk, "),
            (["--ops", "topk_gate", "--providers", "cuda", "--shapes", "tiny"],
             "--providers cuda: none can run on cpu (cuda: "),
            (["--ops", ","], "--ops: no op given; known: topk_gate, "),
            (["--modes", ""], "--modes: no mode given; known: fwd, fwd+bwd, step"),
            (["--shapes", ","], "--shapes: no shape given"),
            (["--shapes", "sweep-k@tiny:N=10"], "--shapes: sweep over K of tiny:N=10"),
            (["--shapes", "tiny:H=0"], "--shapes: shape 'tiny:H=0': T, d and H must be >= 1, got H=0")):
        got = _cli_exit_message(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-plot", *argv], capsys)
        assert message in got, argv
    assert not (tmp_path / "results.json").exists()


def test_cli_drops_repeated_names(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "measure_ceilings", lambda *a, **kw: T.Ceilings(1e12, 1, 1e11, 1))
    rc = cli.main(["--quick", "--device", "cpu", "--shapes", "tiny,tiny", "--ops", "gather_combine,gather_combine",
                   "--modes", "fwd,fwd", "--providers", "reference,torch,reference", "--reps", "1",
                   "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["op"], r["mode"], r["shape"], r["provider"]) for r in rows] == [
        ("gather_combine", "fwd", "tiny", "reference"), ("gather_combine", "fwd", "tiny", "torch")]
    assert cli.name_list("--ops", " train, topk_gate,train ,", C.OPS, "op") == ["train", "topk_gate"]
    same = f"tiny:T={S.parse_shape('tiny').T}"          # the same sizes under another name
    assert [s.name for s in S.resolve(["tiny", same, "tiny:T=7"], "cpu")] == ["tiny", "tiny:T=7"]


def test_cli_rejects_an_unusable_out(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, message in ((a_file, f"--out {a_file}: exists and is not a folder"),
                         (a_file / "below", f"--out {a_file / 'below'}: cannot write there: ")):
        got = _cli_exit_message(["--quick", "--device", "cpu", "--shapes", "tiny", "--ops", "gather_combine",
                                 "--modes", "fwd", "--reps", "1", "--out", str(out), "--no-plot"], capsys)
        assert message in got, out


def test_cli_keeps_an_earlier_runs_results(tmp_path, capsys, monkeypatch):
    """A folder holding results is refused unless --overwrite, which removes all of them (a stale plot
    must not sit beside new numbers); the default folder of a second run that day gets a suffix."""
    monkeypatch.setattr(T, "measure_ceilings", lambda *a, **kw: T.Ceilings(1e12, 1, 1e11, 1))
    argv = ["--quick", "--device", "cpu", "--shapes", "tiny", "--ops", "gather_combine", "--modes", "fwd",
            "--reps", "1", "--out", str(tmp_path), "--no-plot"]
    (tmp_path / "speedup.png").write_bytes(b"an earlier plot")
    assert "holds the results of an earlier run (speedup.png); choose another folder or pass --overwrite" \
        in _cli_exit_message(argv, capsys)
    assert cli.main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "table.txt"]
    (tmp_path / "table.txt").unlink()
    (tmp_path / "table.txt").mkdir()
    assert "table.txt in it is a folder" in _cli_exit_message([*argv, "--overwrite"], capsys)
    base = tmp_path / "day"
    assert cli.default_out_dir(str(base)) == str(base)
    base.mkdir()
    (base / "results.json").write_text("{}")
    assert cli.default_out_dir(str(base)) == f"{base}-2"


def test_shape_specs_reject_empty_sizes():
    for spec, bad in (("tiny:T=0", "T=0"), ("tiny:d=0", "d=0"), ("gpt2:H=0,T=0", "T=0, H=0")):
        with pytest.raises(ValueError, match=f"T, d and H must be >= 1, got {bad}"):
            S.parse_shape(spec)
    with pytest.raises(ValueError, match="none of K = 16, 32, 64, 128, 256 satisfies K <= N"):
        S.resolve(["sweep-k@tiny:N=10"], "cpu")


def test_profile_cli(capsys):
    from bench import profile

    assert profile.main(["--op", "gather_combine", "--provider", "torch", "--shape", "tiny", "--dtype", "fp32",
                         "--device", "cpu", "--calls", "2", "--rows", "200"]) == 0
    out = capsys.readouterr().out
    assert "gather_combine fwd+bwd [torch]" in out and "embedding_bag" in out
    with pytest.raises(SystemExit):
        profile.main(["--op", "topk_gate", "--provider", "gemm", "--device", "cpu"])
    assert "provider 'gemm' does not apply to topk_gate" in capsys.readouterr().err
    for argv, message in ((["--shape", "foo"], "--shape: "), (["--shape", "sweep-k"], "names 5 shapes; profile one"),
                          (["--calls", "0"], "--calls: expected an integer >= 1"),
                          (["--rows", "-3"], "--rows: expected an integer >= 1")):
        with pytest.raises(SystemExit):
            profile.main(["--op", "gather_combine", "--provider", "torch", "--device", "cpu", *argv])
        assert message in capsys.readouterr().err, argv


def test_tune_gate_candidates_and_arguments(monkeypatch, capsys):
    pytest.importorskip("triton")
    from bench import tune_gate

    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    small, large = tune_gate.candidates(32, x), tune_gate.candidates(128, x)
    assert any(c["FULL_MERGE"] for c in small) and large and not any(c["FULL_MERGE"] for c in large)
    assert len(large) < len(small)   # the running set of k = 128 leaves fewer configurations in registers
    assert "full-merge" in tune_gate.label(next(c for c in small if c["FULL_MERGE"]))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        tune_gate.main(["--device", "cpu"])      # no GPU and no interpreter
    assert "needs a CUDA device" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for splits, message in (("0", "expected integers >= 1"), ("two", "expected comma-separated integers")):
        with pytest.raises(SystemExit):
            tune_gate.main(["--device", "cpu", "--splits", splits])
        assert f"--splits: {message}" in capsys.readouterr().err
    for argv, message in ((["--shapes", "foo"], "--shapes: "), (["--out", "/proc/no/such.json"], "--out /proc/no"),
                          (["--top", "0"], "--top: expected an integer >= 1")):
        with pytest.raises(SystemExit):         # before any timing
            tune_gate.main(["--device", "cpu", "--shapes", "tiny", *argv])
        assert message in capsys.readouterr().err, argv
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
            tune_gate.main(["--device", "cuda"])


def test_train_summary_gives_the_ratio_and_names_a_missing_run(tmp_path):
    from bench import train_summary
    for name, rate in (("reference", 1000.0), ("auto", 3500.0)):
        (tmp_path / f"throughput-{name}").mkdir()
        (tmp_path / f"throughput-{name}" / "metrics.json").write_text(json.dumps(
            {"tokens": 40960, "tokens_per_s": rate, "layer_tokens_per_s": None}))
    assert train_summary.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["auto_vs_reference_tokens_per_s"] == pytest.approx(3.5)
    text = "\n".join(train_summary.lines(summary))
    assert "short default run: no metrics.json" in text and "3.50x with harvesting" in text


def test_dry_run_passes_a_good_command_and_names_what_fails():
    from bench import dry_run
    assert dry_run.main(["python", "-m", "bench", "--shapes", "pythia-1.4b:K=128", "--ops", "topk_gate"]) == 0
    assert dry_run.main(["env", "A=1", "python", "-m", "bench.profile", "--op", "train", "--provider", "cuda",
                         "--shape", "pythia-1.4b"]) == 0
    assert dry_run.main(["python", "-m", "bench", "--shapes", "pythia-1.4b:Q=3"]) == 1
    assert dry_run.main(["python", "-m", "bench", "--ops", "nope"]) == 1
    assert dry_run.main(["python", "-m", "bench.tune_gate", "--splits", "0"]) == 1
    assert dry_run.main(["nvidia-smi"]) == 1   # not a python -m command


def test_targets_table_reads_the_session_and_marks_missing_rows(tmp_path):
    from bench import targets
    row = lambda op, mode, shape, provider, median, **extra: dict(op=op, mode=mode, shape=shape, provider=provider,
                                                                 median=median, **extra)
    rows = [row("topk_gate", "fwd", "llama-3.2-3b", "gemm+topk", 6.0), row("topk_gate", "fwd", "llama-3.2-3b", "cuda", 5.0),
            row("topk_gate", "fwd", "llama-3.2-3b", "triton", 4.0),
            row("train", "fwd+bwd", "pythia-1.4b", "cuda", 5.0, frac_matmul=0.44),
            row("train", "fwd+bwd", "pythia-1.4b", "triton", 10.0, frac_matmul=0.22)]
    (tmp_path / "bench-1").mkdir()
    (tmp_path / "bench-1" / "results.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "summary.json").write_text(json.dumps({"auto_vs_reference_tokens_per_s": 3.2}))
    lines = targets.table(*targets.load(str(tmp_path))).splitlines()
    assert lines[2].endswith("| 1.50x | >= 1.3x | yes |")          # the faster of cuda and triton
    assert "| not measured | <= 1.15x | - |" in lines[3]
    assert lines[5].endswith("| 44% | >= 60% | no |")
    assert lines[6].endswith("| 0.50x | >= 0.8x | no |")
    assert lines[7].endswith("| 3.20x | >= 3x | yes |")
