"""The fp8-screened exact gate (kernels/screened_gate.py): its selection against the exact reference, the
paths to the exact kernel (k near N, non-finite inputs, scales out of range, failed certificates, a failed
self-check), the bound itself (every screened U >= the exact logit), the certificate under a poisoned
rescoring, and the self-check's power against a weaker accumulation. On CPU these run under
TRITON_INTERPRET=1: shapes are small and odd."""
from __future__ import annotations

import math

import pytest
import torch

from mxd_fast.specs import SPECS
from mxd_fast.specs.topk_gate import check_selection

pytest.importorskip("triton")
from mxd_fast.kernels import screened_gate as sg  # noqa: E402
from mxd_fast.kernels import topk_gate as tgk  # noqa: E402

pytestmark = pytest.mark.triton

SPEC = SPECS["topk_gate"]


@pytest.fixture
def dev(triton_device, monkeypatch):
    monkeypatch.setenv("MXD_FAST_AUTOTUNE", "0")
    sg.reset_screen_stats()
    return triton_device


def make(B, I, N, dtype, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, I, generator=g).to(device, dtype)
    w = torch.randn(N, I, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    return x, w, b


def check(x, w, b, k, values, indices):
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    check_selection(x, w, b, k, values, indices, SPEC.tolerances[x.dtype])


def same_as_exact(x, w, b, k, values, indices):
    """Bit-identical to the exact kernel's answer (for rows it recomputed: screened rows round their
    fp32 values with torch, which the interpreter's fp32 -> bf16 conversion (truncating) need not match)."""
    ref_v, ref_i = tgk.topk_gate_forward(x, w, b, k)
    torch.testing.assert_close(values, ref_v, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(indices, ref_i)


# ---- selection -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [None, 3])
def test_random_rows_screened_and_exact(dev, dtype, split):
    """Odd sizes, k = 1 and 5, one chunk and a split over N (topk_gate's merge kernel): the exact top-k,
    and the rows are certified by the screen (no fallback on random data at this width)."""
    x, w, b = make(13, 24, 201, dtype, dev, seed=1)
    for k in (1, 5):
        values, indices = sg.screened_topk_gate_forward(x, w, b, k, split=split)
        check(x, w, b, k, values, indices)
    stats = sg.screen_stats()
    assert stats["calls"] == 2 and stats["rows_screened"] == 26 and stats["calls_direct"] == 0
    assert stats["rows_fallback"] == 0 and stats["rows_inconsistent"] == 0


def test_no_bias_and_strided_inputs(dev):
    x, w, _ = make(9, 40, 150, torch.bfloat16, dev, seed=2, bias=False)
    xt = torch.cat((x, x), dim=1)[:, ::2]                   # column stride 2
    values, indices = sg.screened_topk_gate_forward(xt, w, None, 3)
    check(xt, w, None, 3, values, indices)
    assert sg.screen_stats()["rows_screened"] == 9


def test_k_near_n_and_unscreenable_inputs_go_exact(dev):
    """k + m >= N, fp32 inputs and k = 0 are the exact kernel's, counted as direct calls."""
    x, w, b = make(7, 16, 30, torch.bfloat16, dev, seed=3)
    values, indices = sg.screened_topk_gate_forward(x, w, b, 25)
    check(x, w, b, 25, values, indices)
    same_as_exact(x, w, b, 25, values, indices)
    xf, wf, bf = x.float(), w.float(), b.float()
    values, indices = sg.screened_topk_gate_forward(xf, wf, bf, 2)
    same_as_exact(xf, wf, bf, 2, values, indices)
    values, indices = sg.screened_topk_gate_forward(x, w, b, 0)
    assert values.shape == (7, 0) and indices.shape == (7, 0)
    assert sg.screen_stats()["calls_direct"] == 3 and sg.screen_stats()["calls"] == 0


def test_ties_from_duplicated_gate_rows(dev):
    """Exact ties (every expert twice): any of the tied experts is right."""
    x, w, b = make(11, 20, 70, torch.bfloat16, dev, seed=4)
    w2, b2 = torch.cat((w, w)), torch.cat((b, b))
    values, indices = sg.screened_topk_gate_forward(x, w2, b2, 4)
    check(x, w2, b2, 4, values, indices)


def test_near_ties_at_the_kth_value_fall_back(dev):
    """One gate row copied k + m + 6 times, each copy perturbed by one bf16 ulp in one entry, aligned
    with x so that the copies hold the top logits: the k-th and the (k + m + 1)-th logits are within the
    bound's width, the certificate fails, the rows fall back (counted) and the answer is exact."""
    k = 4
    x, w, b = make(6, 32, 90, torch.bfloat16, dev, seed=5)
    copies = k + sg.margin(k, 32) + 6
    base = x[0].clone()
    near = base.repeat(copies, 1)
    cols = torch.arange(copies) % 32
    up = torch.nextafter(near[torch.arange(copies), cols].float(), torch.tensor(math.inf)).to(torch.bfloat16)
    near[torch.arange(copies), cols] = torch.where(torch.arange(copies) % 2 == 0, up, near[torch.arange(copies), cols])
    w = torch.cat((w * 0.1, near))
    b = torch.cat((b * 0.1, torch.zeros(copies, dtype=b.dtype)))
    xr = base.repeat(6, 1)
    values, indices = sg.screened_topk_gate_forward(xr, w, b, k)
    check(xr, w, b, k, values, indices)
    stats = sg.screen_stats()
    assert stats["rows_fallback"] == 6 and stats["rows_inconsistent"] == 0


def test_all_negative_rows(dev):
    """Every logit negative: the top-k values are 0 (relu), certified because every U <= 0."""
    x, w, b = make(8, 24, 120, torch.bfloat16, dev, seed=6)
    b = torch.full_like(b, -200.0)
    values, indices = sg.screened_topk_gate_forward(x, w, b, 3)
    assert bool((values == 0).all())
    check(x, w, b, 3, values, indices)
    assert sg.screen_stats()["rows_fallback"] == 0


@pytest.mark.parametrize("x_scale, w_scale, fallback", [(2.0 ** 40, 2.0 ** -30, 0), (2.0 ** -40, 2.0 ** 20, 0),
                                                       (2.0 ** -60, 1.0, 9)])
def test_huge_and_tiny_norms(dev, x_scale, w_scale, fallback):
    """e4m3's range (2^-6 .. 448) is covered by the scales: the answer is exact, rows whose scale is
    within 2^-50 .. 2^50 are screened, the others (x ~ 2^-60: scale ~ 2^-67) recomputed."""
    x, w, b = make(9, 24, 110, torch.bfloat16, dev, seed=7, bias=False)
    x, w = x * x_scale, w * w_scale
    values, indices = sg.screened_topk_gate_forward(x, w, None, 3)
    check(x, w, None, 3, values, indices)
    stats = sg.screen_stats()
    assert stats["calls"] == 1
    assert stats["rows_fallback"] == fallback


def test_rows_out_of_scale_range_fall_back(dev):
    """Rows with entries near bf16's largest or smallest scale go to the exact kernel, the rest are screened."""
    x, w, b = make(10, 24, 100, torch.bfloat16, dev, seed=8)
    x[2] *= 2.0 ** 100
    x[5] *= 2.0 ** -100
    values, indices = sg.screened_topk_gate_forward(x, w, b, 2)
    check(x, w, b, 2, values, indices)
    assert sg.screen_stats()["rows_fallback"] == 2


def test_nan_and_inf_in_x_rows_go_exact(dev):
    x, w, b = make(9, 24, 100, torch.bfloat16, dev, seed=9)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    x[6, 7] = -float("inf")
    values, indices = sg.screened_topk_gate_forward(x, w, b, 3)
    bad = torch.tensor([1, 4, 6])
    same_as_exact(x[bad], w, b, 3, values[bad], indices[bad])
    good = torch.tensor([0, 2, 3, 5, 7, 8])
    check(x[good], w, b, 3, values[good], indices[good])
    assert sg.screen_stats()["rows_fallback"] == 3


@pytest.mark.parametrize("where", ["weight_nan", "weight_inf", "bias_nan", "bias_inf"])
def test_non_finite_weight_or_bias_goes_exact(dev, where):
    x, w, b = make(7, 24, 100, torch.bfloat16, dev, seed=10)
    bad = float("nan") if where.endswith("nan") else float("inf")
    if where.startswith("weight"):
        w[17, 5] = bad
    else:
        b[40] = bad
    values, indices = sg.screened_topk_gate_forward(x, w, b, 3)
    same_as_exact(x, w, b, 3, values, indices)
    assert sg.screen_stats()["calls_direct"] == 1 and sg.screen_stats()["calls"] == 0


def test_errors_name_the_argument(dev):
    x, w, b = make(3, 8, 40, torch.bfloat16, dev)
    with pytest.raises(TypeError, match="float64"):
        sg.screened_topk_gate_forward(x.double(), w.double(), b.double(), 2)
    with pytest.raises(ValueError, match="k <="):
        sg.screened_topk_gate_forward(x, w, b, tgk.MAX_K + 1)


# ---- the certificate cannot be skipped -----------------------------------------------------

@pytest.mark.parametrize("poison", ["shifted", "zeros", "reversed", "nan"])
def test_poisoned_rescoring_never_passes_silently(dev, monkeypatch, poison):
    """A rescoring that returns wrong logits: the rows fail (counted) and are recomputed exactly."""
    x, w, b = make(8, 24, 120, torch.bfloat16, dev, seed=11)
    true_rescore = sg._rescore

    def wrong(x, weight, bias, cand):
        t = true_rescore(x, weight, bias, cand)
        if poison == "shifted":
            return t + 100.0
        if poison == "zeros":
            return torch.zeros_like(t)
        if poison == "reversed":
            return t.flip(1)
        return torch.full_like(t, math.nan)

    monkeypatch.setattr(sg, "_rescore", wrong)
    values, indices = sg.screened_topk_gate_forward(x, w, b, 3)
    check(x, w, b, 3, values, indices)
    stats = sg.screen_stats()
    assert stats["rows_fallback"] == 8
    if poison != "nan":
        assert stats["rows_inconsistent"] == 8


def test_kernel_writes_every_output(dev):
    """The screen's buffers are poisoned (NaN, -1) before the kernel runs: nothing is left unwritten."""
    x, w, b = make(19, 24, 130, torch.bfloat16, dev, seed=12)
    prep = sg._Prepared(x, w, b, sg._config(32, x))
    for split in (1, 3):
        u, idx = sg._screen(prep.x8, prep.rowc, prep.g8, prep.colc, b, 21, prep.cfg, split)
        assert not bool(u.isnan().any()) and bool((idx >= 0).all()) and bool((idx < 130).all())
        assert bool((u.diff(dim=1) <= 0).all())


# ---- the bound -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bound_holds_elementwise_on_random_inputs(dev, dtype):
    """Every screened relu(U) >= relu(t), t the exact logit in fp64, with and without bias, over scales."""
    for seed, (sx, sw) in enumerate([(1.0, 1.0), (2.0 ** 12, 2.0 ** -9), (2.0 ** -20, 2.0 ** 3)]):
        x, w, b = make(10, 45, 37, dtype, dev, seed=20 + seed)
        x, w = (x.float() * sx).to(dtype), (w.float() * sw).to(dtype)
        assert sg.bound_violations(x, w, b if seed != 1 else None) == 0


def test_bound_holds_on_adversarial_inputs_and_is_not_vacuous(dev):
    """On the self-check's inputs (e4m3-exact, so only the accumulation term is left) no U is below t,
    and U - t stays within the accumulation allowance (a bound far above t would pass anything)."""
    x, w, _ = sg.adversarial_inputs(dev)
    assert sg.bound_violations(x, w, None) == 0
    u = sg.screen_all(x, w, None).double()
    t = (x.double() @ w.double().T).relu()
    allowance = 2 * sg.accumulation_error(sg._INTERPRETER_CONFIG["BLOCK_I"], x.shape[1])
    assert bool((u - t <= allowance * (x.double().norm(dim=1)[:, None] * w.double().norm(dim=1)[None, :])).all())


def _emulated_screen(bits: int, promote: bool):
    """A screen whose accumulation follows the alignment model with `bits` fraction bits per MMA_K
    products, promoted to an exact sum after each instruction or chained through all of I."""
    def screen(prep, bias, keep):
        x8, g8 = prep.x8.double(), prep.g8.double()
        p = x8[:, None, :] * g8[None, :, :]
        total = torch.zeros(p.shape[:2], dtype=torch.float64)
        c = torch.zeros_like(total)
        for i0 in range(0, p.shape[2], sg.MMA_K):
            terms = torch.cat((c.unsqueeze(-1), p[..., i0:i0 + sg.MMA_K]), dim=-1)
            e = torch.frexp(terms.abs().amax(dim=-1))[1]
            quantum = torch.ldexp(torch.ones_like(total), (e - 1 - bits).double()).unsqueeze(-1)
            c = (torch.trunc(terms / quantum) * quantum).sum(-1)
            if promote:
                total, c = total + c, torch.zeros_like(c)
        acc = total + c
        rowc, colc = prep.rowc.double(), prep.colc.double()
        up = acc * rowc[0][:, None] * colc[0][None, :] + colc[3]
        up = up + rowc[1][:, None] * colc[1] + rowc[2][:, None] * colc[2]
        if bias is not None:
            up = up + bias.double()
        return up.relu().float(), torch.arange(g8.shape[0]).expand(x8.shape[0], -1)
    return screen


def test_self_check_catches_a_weaker_accumulation(dev):
    """The self-check's inputs break the bound for an accumulation keeping 9 bits, or 13 bits without
    promotion to fp32, and not for the model's (13 bits, promoted after each instruction)."""
    x, w, _ = sg.adversarial_inputs(dev)
    assert sg.bound_violations(x, w, None, screen=_emulated_screen(13, promote=True)) == 0
    assert sg.bound_violations(x, w, None, screen=_emulated_screen(13, promote=False)) > 0
    assert sg.bound_violations(x, w, None, screen=_emulated_screen(9, promote=True)) > 0


def test_failed_self_check_disables_screening(dev, monkeypatch):
    x, w, b = make(5, 24, 100, torch.bfloat16, dev, seed=13)
    assert sg.fp8_screen_sound(x.device)
    monkeypatch.setitem(sg._sound, (x.device.type, x.device.index), False)
    values, indices = sg.screened_topk_gate_forward(x, w, b, 2)
    same_as_exact(x, w, b, 2, values, indices)
    assert sg.screen_stats()["calls_direct"] == 1


def test_accumulation_error_constant():
    """eps_acc: one instruction's (MMA_K + 1) 2^-MMA_BITS per MMA_K products, chained per dot, plus the
    fp32 promotion sums."""
    e1 = (sg.MMA_K + 1) * 2.0 ** -sg.MMA_BITS
    assert sg.accumulation_error(32, 32) == pytest.approx(e1 / (1 - e1) * (1 + 2.0 ** -24) + 2.0 ** -24, rel=1e-6)
    assert sg.accumulation_error(64, 3072) > 2 * e1
    assert sg.accumulation_error(64, 3072) < 2.0 ** -6


def test_the_gpu_bench_checks_the_bound_and_the_selection(dev, tmp_path, capsys):
    # bench.gate_screen_gpu, as bench/gpu_session.sh runs it, at a shape the interpreter runs in seconds
    import json
    from bench import gate_screen_gpu as GB
    out = tmp_path / "screen.json"
    assert GB.main(["--device", str(dev), "--shapes", "tiny", "--tokens", "33", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert report["self_check"] is True and report["adversarial_bound_violations"] == 0
    assert row["bound_violations"] == 0 and row["rows_with_other_indices"] == 0
    assert row["screen_stats"]["rows_screened"] == 33
    assert all("ms" in row[p] for p in ("addmm_topk", "exact", "screened"))
    assert "fp8 screen self-check: passed" in capsys.readouterr().out
