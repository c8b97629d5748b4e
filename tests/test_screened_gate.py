"""The screened exact top-k gate (mxd_fast/_torch/screened_gate.py): the same selection as the direct
path up to ties and fp32 rounding, on random and adversarial inputs; its switch, self-check and
counters."""
import math

import pytest
import torch

from mxd_fast._torch import screened_gate as sg
import mxd_fast
from mxd_fast._torch.topk_gate import topk_gate_direct_forward

needs_bf16 = pytest.mark.skipif(not sg.bf16_screen_sound(),
                                reason="the bf16 GEMM here fails the screen's self-check")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(sg.ENV_VAR, raising=False)
    monkeypatch.setattr(sg, "_support", dict(sg._support))   # a test's cached answers stay in the test
    sg.reset_screen_stats()


class Direct:
    """The direct path (screening switched off), counting the rows it is given."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, weight, bias, k):
        self.rows += x.shape[0]
        return topk_gate_direct_forward(x, weight, bias, k)


def _inputs(B, I, N, seed=0, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, I, generator=g) * scale
    w = torch.randn(N, I, generator=g) / math.sqrt(I)
    b = torch.randn(N, generator=g) * 0.1 if bias else None
    return x, w, b


def _check_exact(x, w, b, k, values, indices):
    """values/indices are a top-k of relu(x w^T + b) up to ties and fp32 rounding: values sorted, each
    selected expert's exact (fp64) logit equal to its value, no unselected expert above the k-th value,
    and the sorted values equal to the exact top-k values."""
    assert values.dtype == x.dtype and indices.dtype == torch.int64 and values.shape == indices.shape
    logits = x.double() @ w.double().T + (0 if b is None else b.double())
    relu = logits.relu()
    # each fp32 logit is within gamma (sum |x_i w_i| + |b|) of the exact one; twice that covers both sides
    # (plus 2^-126 per product or sum lost to underflow)
    tol = 2 * (x.shape[1] + 2) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T
                                                + (0 if b is None else b.double().abs()))
    tol += 2 * (x.shape[1] + 2) * 2.0 ** -126
    assert (values[:, :-1] >= values[:, 1:]).all(), "values not sorted descending"
    assert all(len(set(r.tolist())) == k for r in indices), "an expert selected twice"
    v = values.double()
    assert ((relu.gather(1, indices) - v).abs() <= tol.gather(1, indices)).all(), "value != its logit"
    chosen = torch.zeros_like(relu, dtype=torch.bool).scatter_(1, indices, True)
    above = relu.masked_fill(chosen, -math.inf) - tol > v[:, -1:]
    assert not above.any(), "an unselected expert beats the k-th value"
    ref = relu.topk(k, dim=1).values
    row_tol = tol.max(dim=1, keepdim=True).values
    assert ((ref - v).abs() <= row_tol).all(), "sorted values differ from the exact top-k"


def _same_as_direct(x, w, b, k, values, indices):
    """Bit-for-bit the direct path's result (NaN equal to NaN), for inputs it must route there."""
    dv, di = Direct()(x, w, b, k)
    assert torch.equal(values.isnan(), dv.isnan())
    assert torch.equal(values.nan_to_num(), dv.nan_to_num()) and torch.equal(indices, di)


# ---- switch, self-check, support -----------------------------------------------------------

def test_mode_from_environment(monkeypatch):
    assert sg.exact_gate_mode() == "auto"
    for raw, want in (("", "auto"), (" Direct ", "direct"), ("SCREENED", "screened"), ("auto", "auto")):
        monkeypatch.setenv(sg.ENV_VAR, raw)
        assert sg.exact_gate_mode() == want
    for bad in ("fast", "1", "screen"):
        monkeypatch.setenv(sg.ENV_VAR, bad)
        with pytest.raises(ValueError, match="MXD_FAST_EXACT_GATE"):
            sg.exact_gate_mode()
        with pytest.raises(ValueError, match="MXD_FAST_EXACT_GATE"):
            sg.topk_gate_forward(*_inputs(4, 8, 64), 2, Direct())


@needs_bf16
def test_forward_follows_the_mode(monkeypatch):
    x, w, b = _inputs(9, 21, 150)
    monkeypatch.setattr(sg, "_support", {"sound": True, "supported": False})
    for mode, screens in (("direct", False), ("screened", True), ("auto", False)):
        monkeypatch.setenv(sg.ENV_VAR, mode)
        sg.reset_screen_stats()
        values, indices = sg.topk_gate_forward(x, w, b, 3, Direct())
        _check_exact(x, w, b, 3, values, indices)
        assert sg.screen_stats()["calls"] == int(screens), mode
    monkeypatch.setattr(sg, "_support", {"sound": True, "supported": True})
    monkeypatch.setenv(sg.ENV_VAR, "auto")
    sg.topk_gate_forward(x, w, b, 3, Direct())
    assert sg.screen_stats()["calls"] == 0          # fewer than _MIN_ROWS rows: direct under auto
    monkeypatch.setattr(sg, "_MIN_ROWS", 9)
    sg.topk_gate_forward(x, w, b, 3, Direct())
    assert sg.screen_stats()["calls"] == 0          # fewer than auto_min_experts experts: direct under auto
    assert sg.auto_min_experts(3, 21) > 150
    monkeypatch.setattr(sg, "_MIN_EXPERTS_BASE", 0)
    monkeypatch.setattr(sg, "_MIN_EXPERTS_PER_CANDIDATE", 150 // (3 + sg.margin(3, 21)))
    sg.topk_gate_forward(x, w, b, 3, Direct())
    assert sg.screen_stats()["calls"] == 1
    monkeypatch.setattr(sg, "_MIN_EXPERTS_PER_CANDIDATE", 150 // (3 + sg.margin(3, 21)) + 1)
    sg.topk_gate_forward(x, w, b, 3, Direct())
    assert sg.screen_stats()["calls"] == 1
    # forced, but the GEMM fails its self-check: direct, with a warning
    monkeypatch.setattr(sg, "_support", {"sound": False})
    monkeypatch.setenv(sg.ENV_VAR, "screened")
    monkeypatch.setattr(sg, "_warned", set())
    sg.reset_screen_stats()
    with pytest.warns(RuntimeWarning, match="self-check"):
        sg.topk_gate_forward(x, w, b, 3, Direct())
    assert sg.screen_stats()["calls"] == 0


def test_screening_supported_measures_once(monkeypatch):
    calls = []

    def speedup(value):
        def measure():
            calls.append(value)
            return value
        return measure

    for value, want in ((1.2, False), (2.5, True)):
        monkeypatch.setattr(sg, "_support", {"sound": True})
        monkeypatch.setattr(sg, "_cpu_has_bf16_dot", lambda: True)
        monkeypatch.setattr(sg, "_bf16_speedup", speedup(value))
        assert sg.screening_supported() is want
        assert sg.screening_supported() is want
    assert calls == [1.2, 2.5]                        # measured once per process (per cache)
    monkeypatch.setattr(sg, "_support", {"sound": True})
    monkeypatch.setattr(sg, "_cpu_has_bf16_dot", lambda: False)
    assert sg.screening_supported() is False          # no bf16 dot products: never measured
    assert calls == [1.2, 2.5]
    monkeypatch.setattr(sg, "_support", {"sound": False})
    monkeypatch.setattr(sg, "_cpu_has_bf16_dot", lambda: True)
    assert sg.screening_supported() is False


def test_speedup_measurement_runs():
    assert sg._bf16_speedup() > 0


def test_self_check_accepts_this_gemm_and_rejects_unsound_ones(monkeypatch):
    assert sg._self_check() is True

    def bf16_blocks(a, b, block=64):        # partial sums kept in bf16
        out = None
        for k0 in range(0, a.shape[1], block):
            p = a[:, k0:k0 + block].float() @ b[:, k0:k0 + block].float().T
            out = p.to(torch.bfloat16) if out is None else (out.float() + p).to(torch.bfloat16)
        return out

    def truncated(a, b):                    # output rounded toward zero
        z = a.float() @ b.float().T
        return (z.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)

    def fp32_then_bf16(a, b):               # the model itself: passes
        return (a.float() @ b.float().T).to(torch.bfloat16)

    for gemm, sound in ((bf16_blocks, False), (lambda a, b: bf16_blocks(a, b, 256), False),
                        (truncated, False), (fp32_then_bf16, True)):
        monkeypatch.setattr(sg, "_screen_mm", gemm)
        assert sg._self_check() is sound


def test_bf16_round_up():
    g = torch.Generator().manual_seed(1)
    scales = 10.0 ** torch.randint(-40, 38, (2000,), generator=g)
    v = torch.cat([torch.randn(2000, generator=g, dtype=torch.float64) * scales,
                   torch.tensor([1 + 2 ** -8 + 2 ** -30, 0.0, -0.0, 2 ** -130, -(2 ** -130), 2 ** -126, -1.0],
                                dtype=torch.float64)])
    up = sg._bf16_up(v)
    assert up.dtype == torch.bfloat16
    u = up.double()
    assert (u >= v).all()
    assert ((u == 0) | (u.abs() >= 2 ** -126)).all()          # never subnormal
    below = torch.nextafter(up, torch.full_like(up, -math.inf)).double()
    normal = (u.abs() > 2 ** -126) | (u < 0)
    assert (below[normal & (u != 0)] < v[normal & (u != 0)]).all()   # the least such number


def test_row_norms_are_upper_bounds():
    """fp32 norms inflated for their rounding and flushes, fp64 where fp32 would overflow or underflow."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 300, generator=g) * torch.logspace(-44, 37, 12).unsqueeze(1)
    rows[3, ::2] = 0
    rows[5] = 1e-30
    rows[5, 7] = 1.0                                       # one big entry, the rest's squares underflow
    rows[7] = 0
    exact = rows.double().norm(dim=1)
    bound = sg._row_norms(rows)
    assert bound.dtype == torch.float64 and (bound >= exact).all()
    scale = torch.where(exact > 0, exact, 1.0)
    assert (((bound - exact) / scale)[exact > 1e-30] < 1e-3).all()
    assert sg._row_norms(torch.tensor([[math.nan, 1.0], [math.inf, 0.0]])).isnan().tolist() == [True, False]


# ---- the bound ---------------------------------------------------------------------------

def _full_screen(x, w, b):
    """U and the screen's interval for every (row, expert), from the module's own pieces."""
    I = x.shape[1]
    width = -(-(I + sg._COEFFS) // sg._PAD) * sg._PAD
    x_aug, x_norm, ok = sg._row_side(x, width)
    w_aug = torch.zeros(w.shape[0], width, dtype=torch.bfloat16)
    assert sg._expert_side(w, b, w_aug, torch.empty(7, w.shape[1])) is not None   # residuals 7 rows at a time
    L = sg._screen_mm(x_aug, w_aug)
    cand = torch.arange(w.shape[0]).expand(x.shape[0], -1)
    lower, upper = sg._screen_interval(L, cand, x_aug, w_aug[:, I:I + sg._COEFFS], b, I)
    return lower, upper, ok


def _aligned_with_residual(rows):
    """Per row of `rows`, a bf16-exact vector v (so v has no residual of its own) orthogonal to bf16(row)
    and aligned with the row's residual row - bf16(row): the screened product bf16(row) . v is about 0
    while row . v is about ||residual|| ||v||, which makes Cauchy-Schwarz's term nearly tight."""
    low = rows.to(torch.bfloat16).double()
    r = rows.double() - low
    v = r - (r * low).sum(1, keepdim=True) / (low * low).sum(1, keepdim=True) * low
    return (v / v.norm(dim=1, keepdim=True)).float().to(torch.bfloat16).float()


@needs_bf16
@pytest.mark.parametrize("case", ["random", "scaled-up", "scaled-down", "subnormal", "subnormal-times-huge",
                                  "cancel", "mixed-rows", "aligned-x-residual", "aligned-weight-residual"])
def test_bound_holds_for_every_logit(case):
    x, w, b = _inputs(33, 75, 129, seed=2)
    if case == "scaled-up":
        x, w = x * 1e30, w * 1e-31
    elif case == "scaled-down":
        x, w, b = x * 1e-20, w * 1e-17, b * 1e-37
    elif case == "subnormal":
        x[:, ::3] *= 1e-39                                 # fp32 subnormals in x and w
        w[::2, 1::3] *= 1e-40
    elif case == "subnormal-times-huge":                   # bf16 dot products read subnormals as 0
        x, w = x * 1e-40, w * 1e37
    elif case == "cancel":
        x[:, 0], w[:, 0] = 3e3, 1.0
        x[:, 1], w[:, 1] = 3e3, -1.0                       # two huge terms that cancel
    elif case == "mixed-rows":
        x = x * torch.logspace(-30, 30, 33).unsqueeze(1)
    elif case == "aligned-x-residual":
        w[:33] = _aligned_with_residual(x)                 # expert b against row b
    elif case == "aligned-weight-residual":
        x = _aligned_with_residual(w[:33]) * 4.0
    t = x.double() @ w.double().T + b.double()
    lower, upper, ok = _full_screen(x, w, b)
    assert ok.all()
    assert (upper >= t).all() and (lower <= t).all()
    scale = x.double().norm(dim=1, keepdim=True) * w.double().norm(dim=1) + b.double().abs()
    if case == "random":
        assert ((upper - t) / scale).max() < 0.02           # a bound, and a useful one
    if case.startswith("aligned"):
        # the screened value misses the logit by nearly the whole Cauchy-Schwarz term
        xs, ws = x.double(), w[:33].double()
        low_x, low_w = x.to(torch.bfloat16).double(), w[:33].to(torch.bfloat16).double()
        miss = (t.diagonal() - (low_x * low_w).sum(1) - b[:33].double()).abs()
        cs = (xs - low_x).norm(dim=1) * ws.norm(dim=1) + low_x.norm(dim=1) * (ws - low_w).norm(dim=1)
        assert (miss >= 0.8 * cs).all()


@needs_bf16
def test_rows_that_could_overflow_are_marked():
    """A row whose fp32 logit sums could pass fp32's range is left to the direct path, whatever the
    screen's own sums did."""
    x, w, b = _inputs(6, 10, 100, seed=14)
    x[2] *= 3e37                                          # ||x|| ||g|| about 1e38 > 2^126
    width = -(-(10 + sg._COEFFS) // sg._PAD) * sg._PAD
    x_aug, x_norm, ok = sg._row_side(x, width)
    assert ok.all()
    sg._screen(x_aug, x_norm, ok, w, b, 40)
    assert ok.tolist() == [True, True, False, True, True, True]


# ---- exactness -----------------------------------------------------------------------------

@needs_bf16
@pytest.mark.parametrize("B,I,N,k,bias", [
    (37, 53, 301, 1, True), (61, 97, 1009, 5, True), (19, 13, 200, 7, False), (45, 130, 777, 33, True),
    (7, 3, 150, 2, True)])
def test_matches_direct_on_random_data(B, I, N, k, bias):
    x, w, b = _inputs(B, I, N, seed=B, bias=bias)
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, k, direct)
    _check_exact(x, w, b, k, values, indices)
    stats = sg.screen_stats()
    assert stats["calls"] == 1 and stats["rows_screened"] == B and stats["rows_inconsistent"] == 0
    assert direct.rows == stats["rows_fallback"]
    dv, _ = direct(x, w, b, k)
    torch.testing.assert_close(values, dv, rtol=1e-5, atol=1e-5)


@needs_bf16
def test_second_round_up_to_every_expert():
    """k + m < N <= k + 3m: the second round rescores every expert (no non-candidate left)."""
    k, I = 4, 16
    m = sg.margin(k, I)
    x, w, b = _inputs(20, I, k + m + 3, seed=7, bias=False)
    w[:k + m + 3] = w[0] * (1 + 1e-6 * torch.arange(k + m + 3).unsqueeze(1))   # near-equal experts
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, k, direct)
    _check_exact(x, w, b, k, values, indices)
    assert sg.screen_stats()["rows_retried"] > 0 and direct.rows == 0


@pytest.mark.parametrize("k", [60, 50, 44])
def test_too_few_experts_to_screen(k):
    """k = N, or N <= k + m: the whole batch goes to the direct path."""
    x, w, b = _inputs(11, 9, 60, seed=3)
    assert sg.margin(k, 9) == 16 and not sg.screenable(x, w, b, k) and sg.screenable(x, w, b, 43)
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, k, direct)
    assert direct.rows == 11 and sg.screen_stats()["calls_direct"] == 1
    _check_exact(x, w, b, k, values, indices)


def test_other_dtypes_go_direct():
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        x, w, b = (t.to(dtype) for t in _inputs(5, 8, 200))
        direct = Direct()
        sg.screened_topk_gate(x, w, b, 3, direct)
        assert direct.rows == 5
    assert not sg.screenable(x.float(), w.float().to("meta"), None, 3)
    assert sg.screen_stats()["calls"] == 0


@needs_bf16
@pytest.mark.parametrize("grouped", [False, True])
def test_tiles_and_merges(monkeypatch, grouped):
    """Many expert and row tiles (grouped top-k within them or not): the running top set across tiles
    is the global one."""
    monkeypatch.setattr(sg, "_TILE_EXPERTS", 50)
    monkeypatch.setattr(sg, "_TILE_PER_KEEP", 5)
    monkeypatch.setattr(sg, "_TILE_ELEMENTS", 700)
    calls = []
    if grouped:
        def group_size(n, keep):
            calls.append(n // 4 >= keep)
            return 4 if n // 4 >= keep else 1
        monkeypatch.setattr(sg, "_group_size", group_size)
    x, w, b = _inputs(41, 29, 613, seed=4)
    for k in (1, 6, 23):
        values, indices = sg.screened_topk_gate(x, w, b, k, Direct())
        _check_exact(x, w, b, k, values, indices)
    assert sg.screen_stats()["calls"] == 3
    assert not grouped or any(calls)


@pytest.mark.parametrize("T,keep,G", [(4096, 65, 16), (1000, 20, 8), (5107, 33, 16), (777, 3, 32)])
def test_grouped_tile_top_k(monkeypatch, T, keep, G):
    """_tile_top's grouped selection keeps the keep largest values (ties: any tied entry)."""
    monkeypatch.setattr(sg, "_group_size", lambda n, k: G)
    g = torch.Generator().manual_seed(T)
    for logits in (torch.randn(37, T, generator=g).to(torch.bfloat16),
                   torch.randint(-3, 4, (37, T), generator=g).to(torch.bfloat16)):    # many ties
        v, i = sg._tile_top(logits, keep)
        assert v.shape == i.shape == (37, keep)
        assert torch.equal(logits.gather(1, i), v)
        assert all(len(set(r.tolist())) == keep for r in i)
        want = logits.float().topk(keep, dim=1).values
        assert torch.equal(v.float().sort(dim=1, descending=True).values, want)


@needs_bf16
def test_near_ties_at_the_kth_value():
    """Experts whose logits differ from the k-th by far less than the bound: retried or sent to the
    direct path, never decided by the screen."""
    x, w, b = _inputs(30, 40, 400, seed=5, bias=False)
    k = 10
    base = w[0].clone()
    for j in range(60):                         # 60 experts with logits equal up to a relative 1e-7
        w[j] = base * (1 + 1e-7 * j)
    x[:, :] = base * 50 + 0.01 * x              # every row prefers these experts
    values, indices = sg.screened_topk_gate(x, w, b, k, Direct())
    _check_exact(x, w, b, k, values, indices)
    # exact duplicates: any of the tied experts may be chosen
    w[60:120] = w[0]
    values, indices = sg.screened_topk_gate(x, w, b, k, Direct())
    _check_exact(x, w, b, k, values, indices)


@needs_bf16
def test_duplicated_rows_one_ulp_apart_fall_back():
    """200 copies of one gate row, each perturbed by one ulp in one entry, top every row: no margin
    separates them, so each row is recomputed by the direct path, and the counter says so."""
    x, w, b = _inputs(12, 31, 500, seed=6, bias=False)
    base = w[7].clone()
    w[:200] = base
    cols = torch.arange(200) % 31
    w[torch.arange(200), cols] = torch.nextafter(base[cols], torch.full((200,), math.inf))
    x = base * 40 + 0.001 * x
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, 20, direct)
    _check_exact(x, w, b, 20, values, indices)
    stats = sg.screen_stats()
    assert stats["rows_fallback"] == 12 == direct.rows and stats["rows_retried"] == 12
    assert stats["rows_inconsistent"] == 0


@needs_bf16
@pytest.mark.parametrize("case,fallback", [("clearly-negative", False), ("few-positive", False),
                                           ("just-below-zero", True), ("few-positive-rest-just-below", True)])
def test_relu_ties_at_zero(case, fallback):
    """Rows with fewer than k positive logits: v_k = 0 and every logit <= 0 ties with it. Certified where
    the other logits are clearly negative; where 200 experts sit just below zero (within the bound of
    it) the screen cannot tell them from positive ones, and the rows go to the direct path."""
    x, w, b = _inputs(25, 17, 300, seed=8)
    k = 8
    b = b * 0 - 100.0                                # every expert clearly negative ...
    if case.startswith("few-positive"):
        b[[5, 77, 230]] = 200.0                     # ... but three, clearly positive
    if "below" in case:
        # 200 experts with logit -eps exactly: [a, -a, c, -c, .., -eps, 0..] . [1, .., 1, x_9..]; the
        # screen's bound (about 2^-8 ||x|| ||g||) is far wider than eps
        x[:, :9] = 1.0
        pairs = torch.rand(200, 4, generator=torch.Generator().manual_seed(0)) + 0.5
        w[100:300] = 0.0
        w[100:300, 0:8:2], w[100:300, 1:8:2] = pairs, -pairs
        w[100:300, 8] = -1e-3 * (1 + torch.rand(200))
        b[100:300] = 0.0
        t = x.double() @ w.double().T
        assert ((t[:, 100:300] < 0) & (t[:, 100:300] > -3e-3)).all()
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, k, direct)
    _check_exact(x, w, b, k, values, indices)
    assert (values[:, 3 if case.startswith("few-positive") else 0:] == 0).all()
    stats = sg.screen_stats()
    assert stats["rows_fallback"] == direct.rows == (25 if fallback else 0)


@needs_bf16
@pytest.mark.parametrize("case", ["x1e30-w1e-30", "tiny", "subnormal", "past-bf16", "overflow"])
def test_extreme_scales(case):
    x, w, b = _inputs(14, 23, 211, seed=9)
    if case == "x1e30-w1e-30":
        x, w = x * 1e30, w * 1e-30
    elif case == "tiny":                           # logits underflow fp32
        x, w, b = x * 1e-30, w * 1e-30, None
    elif case == "subnormal":
        x, w = x * 1e-41, w * 1e38                 # x entirely subnormal
    elif case == "past-bf16":                      # finite fp32 entries that round to inf in bf16
        x[3, 0] = 3.4e38
        w = w * 1e-39
        x[5] = 3.39e38
    elif case == "overflow":                       # fp32 logits overflow in two rows
        w = w * 100
        x[2] *= 1e37
        x[4] *= -1e37
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, 5, direct)
    if torch.isfinite(values).all() and case != "overflow":
        _check_exact(x, w, b, 5, values, indices)
    else:
        rows = (~torch.isfinite(values)).any(1)
        _same_as_direct(x[rows], w, b, 5, values[rows], indices[rows])
        _check_exact(x[~rows], w, b, 5, values[~rows], indices[~rows])
    # compensating scales screen; logits lost to underflow, x lost to bf16's flush of subnormals and rows
    # past bf16's or fp32's range go to the direct path
    want = {"x1e30-w1e-30": 0, "tiny": 14, "subnormal": 14, "past-bf16": 2, "overflow": 2}[case]
    assert sg.screen_stats()["rows_fallback"] == direct.rows == want


@needs_bf16
@pytest.mark.parametrize("where", ["x-nan", "x-inf", "x-neg-inf", "weight-nan", "weight-inf", "bias-nan",
                                   "bias-inf"])
def test_nan_and_inf_behave_as_the_direct_path(where):
    x, w, b = _inputs(16, 19, 240, seed=10)
    bad = {"nan": math.nan, "inf": math.inf, "neg-inf": -math.inf}[where.split("-", 1)[1]]
    if where.startswith("x"):
        x[3, 4] = bad
        x[9] = bad
    elif where.startswith("weight"):
        w[17, 2] = bad
    else:
        b[101] = bad
    values, indices = sg.screened_topk_gate(x, w, b, 6, Direct())
    if where.startswith("x"):
        rows = torch.zeros(16, dtype=torch.bool)
        rows[[3, 9]] = True
        _same_as_direct(x[rows], w, b, 6, values[rows], indices[rows])
        _check_exact(x[~rows], w, b, 6, values[~rows], indices[~rows])
        assert sg.screen_stats()["rows_fallback"] == 2
    else:
        _same_as_direct(x, w, b, 6, values, indices)
        assert sg.screen_stats()["calls_direct"] == 1


# ---- the certificate cannot be skipped -----------------------------------------------------

@needs_bf16
@pytest.mark.parametrize("poison", ["raise-last", "lower-first", "permute", "zeros", "half", "nan"])
def test_poisoned_rescoring_is_caught(monkeypatch, poison):
    """A rescoring that returns wrong logits makes rows fall back (or the call fail), never a wrong
    selection."""
    x, w, b = _inputs(24, 37, 400, seed=11)
    k = 5
    honest = sg._rescore

    def poisoned(x_, w_, b_, cand):
        out = honest(x_, w_, b_, cand)
        if poison == "raise-last":
            out[:, -1] += 10.0                     # a weak candidate looks like the best
        elif poison == "lower-first":
            out[:, 0] -= 10.0                      # the best candidate looks weak
        elif poison == "permute":
            out = out.flip(1)
        elif poison == "zeros":
            out.zero_()
        elif poison == "half":
            out *= 0.5
        else:
            out[:, 1] = math.nan
        return out

    monkeypatch.setattr(sg, "_rescore", poisoned)
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, k, direct)
    _check_exact(x, w, b, k, values, indices)
    stats = sg.screen_stats()
    assert stats["rows_fallback"] == 24 == direct.rows
    if poison != "nan":
        assert stats["rows_inconsistent"] == 24


@needs_bf16
def test_poisoned_bound_threshold_is_caught(monkeypatch):
    """The certificate compares with the bound itself: a threshold forced too high fails every row."""
    x, w, b = _inputs(10, 20, 300, seed=12)
    monkeypatch.setattr(sg, "_upper", lambda L: L + 1e3)
    direct = Direct()
    values, indices = sg.screened_topk_gate(x, w, b, 4, direct)
    _check_exact(x, w, b, 4, values, indices)
    assert direct.rows == 10


@needs_bf16
def test_counters_accumulate_and_reset():
    x, w, b = _inputs(13, 21, 250, seed=13)
    for _ in range(2):
        sg.screened_topk_gate(x, w, b, 3, Direct())
    stats = sg.screen_stats()
    assert stats["calls"] == 2 and stats["rows_screened"] == 26
    sg.screened_topk_gate(x[:0], w, b, 3, Direct())            # empty batch: direct
    assert sg.screen_stats()["calls_direct"] == 1
    sg.reset_screen_stats()
    assert all(v == 0 for v in sg.screen_stats().values())


# ---- through the op --------------------------------------------------------------------------

@needs_bf16
def test_the_op_screens_on_the_torch_backend(monkeypatch):
    """mxd_fast.topk_gate on the torch backend screens where MXD_FAST_EXACT_GATE says so; the backward
    pass sees the same values and indices either way."""
    x, w, b = _inputs(40, 33, 500, seed=15)
    x = x.reshape(4, 10, 33)
    results = {}
    for mode in ("direct", "screened"):
        monkeypatch.setenv(sg.ENV_VAR, mode)
        sg.reset_screen_stats()
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        with mxd_fast.use_backend("torch"):
            values, indices = mxd_fast.topk_gate(xs, ws, bs, 7)
            (values * torch.arange(7.0)).sum().backward()
        assert sg.screen_stats()["calls"] == (mode == "screened")
        _check_exact(x.reshape(40, 33), w, b, 7, values.detach().reshape(40, 7), indices.reshape(40, 7))
        results[mode] = (values.detach(), indices, xs.grad, ws.grad, bs.grad)
    assert torch.equal(results["direct"][1], results["screened"][1])      # no ties in random data
    for got, want in zip(results["screened"], results["direct"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_bench_checks_a_trained_gate_on_its_real_inputs(embedded, tmp_path, monkeypatch):
    # bench.gate_screen --run: real MLP inputs read through the model, the selection compared with direct's
    from bench import gate_screen as GS
    from bench.timing import TimingConfig
    from mxd_fast.train import data as D
    from mxd_fast.train.layer_io import save_layer
    torch.manual_seed(0)
    layer = mxd_fast.MxD(576, 48, 576, 400, 8, activation="silu", glu=True)
    save_layer(layer, tmp_path, {"model": {"name": "embedded:model.gguf", "layer": 2}})
    monkeypatch.setattr(D, "load_model", lambda *args, **kwargs: embedded)
    row = GS.trained_gate_row(str(tmp_path), 100, TimingConfig(warmup_calls=0, min_reps=1, max_reps=1,
                                                                target_time=0.0))
    assert row["tokens"] == 100 and row["shape"].startswith("trained mxd layer 2 (576 x 400, K = 8)")
    assert row["screened_calls"] == 1 and row["screen_stats"]["rows_screened"] == 100
    assert row["rows_with_other_indices"] == 0 and row["max_value_difference"] < 1e-4
    assert all("ms" in row[p] for p in ("dense", "direct", "screened"))


def test_the_bench_times_the_gate_and_the_layer_against_the_reference(tmp_path, capsys):
    from bench import gate_screen as GS
    out = tmp_path / "rows.json"
    assert GS.main(["--shapes", "tiny", "--layer", "--reps", "1", "--threads", "1", "--out", str(out)]) == 0
    import json
    row = json.loads(out.read_text())["rows"][0]
    for key in ("dense", "direct", "screened", "layer_reference", "layer_direct", "layer_screened"):
        assert row[key]["ms"] > 0, key
    assert "layer fwd+bwd ms, reference / direct / screened" in capsys.readouterr().out
