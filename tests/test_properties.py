"""Property-based tests: random shapes, dtypes, k, leading dims and strides; every backend present
agrees with the reference on values and gradients. Bounded draws keep the run within minutes."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mxd_fast
from mxd_fast import reference
from conftest import tolerance

PROFILE = settings(max_examples=25, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    I = draw(st.integers(1, 24))
    H = draw(st.integers(1, 24))
    O = draw(st.integers(1, 24))
    N = draw(st.integers(1, 70))
    k = draw(st.integers(1, N))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    transpose_weight = draw(st.booleans())
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return lead, I, H, O, N, k, dtype, transpose_weight, bias, seed


def _tensors(problem, device):
    lead, I, H, O, N, k, dtype, transpose_weight, bias, seed = problem
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    gate = r(I, N).t() if transpose_weight else r(N, I)      # non-contiguous weight half of the time
    return dict(x=r(*lead, I), gate=gate, gate_bias=r(N) if bias else None, z=r(*lead, H), decoder=r(H, O),
                experts=r(N, O), out_bias=r(O) if bias else None)


@given(problem=problems())
@PROFILE
def test_layer_matches_reference(backend, device, problem):
    _check_layer(problem, device)


@pytest.mark.parametrize("I,H,O", [(0, 6, 4), (8, 0, 4), (8, 6, 0), (0, 0, 0)])
def test_zero_width_features_match_reference(backend, device, I, H, O):
    """An empty input, hidden or output width: the gate sees only its bias, z @ decoder is zero, or
    every output and its gradient are empty."""
    for seed in range(3):
        _check_layer(((2, 3), I, H, O, 9, 3, torch.float64, False, True, seed), device)


def _check_layer(problem, device):
    k, dtype = problem[5], problem[6]
    t = _tensors(problem, device)
    leaves = {n: v.clone().requires_grad_() for n, v in t.items() if v is not None}
    results = []
    for impl in (mxd_fast, reference):
        p = {n: v.detach().clone().requires_grad_() for n, v in leaves.items()}
        get = lambda n: p.get(n)  # noqa: E731
        values, indices = impl.topk_gate(p["x"], p["gate"], get("gate_bias"), k)
        y = impl.mxd_decode(p["z"], p["decoder"], p["experts"], values, indices, get("out_bias"))
        y2 = impl.gather_combine(p["experts"], values, indices)
        ((y * 1.5).sum() + y2.square().sum()).backward()
        results.append((values, y, y2, {n: v.grad for n, v in p.items()}))
    tol = tolerance(dtype)
    (v_fast, y_fast, y2_fast, g_fast), (v_ref, y_ref, y2_ref, g_ref) = results
    torch.testing.assert_close(v_fast, v_ref, **tol)
    # Outputs and gradients agree whenever the selection is unambiguous: no near-tie of positive values
    # across the k-th place (experts tied at zero contribute nothing, whichever is chosen).
    ordered = torch.relu(t["x"].double() @ t["gate"].double().T +
                         (0 if t["gate_bias"] is None else t["gate_bias"].double())).sort(-1, descending=True).values
    if k < ordered.shape[-1]:
        ambiguous = ((ordered[..., k - 1] - ordered[..., k]) < 1e-3) & (ordered[..., k - 1] > 0)
        if ambiguous.any():
            return
    for got, want in ((y_fast, y_ref), (y2_fast, y2_ref)):
        torch.testing.assert_close(got, want, **tol)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], **tol, msg=name)


def test_nan_and_inf_propagate_like_reference(backend, device):
    """Policy: NaN counts as the largest logit (as in torch.topk), so it is selected, never dropped,
    and poisons that token's outputs; +Inf is selected like any large value."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g).to(device)
    w = torch.randn(20, 6, generator=g).to(device)
    x[1, 2] = float("nan")
    w[7] = 0.0
    w[7, 0] = float("inf")
    x[:, 0] = -1.0
    x[2, 0] = 1.0
    values, indices = mxd_fast.topk_gate(x, w, None, 3)
    ref_values, ref_indices = reference.topk_gate(x, w, None, 3)
    torch.testing.assert_close(values, ref_values, equal_nan=True)
    assert torch.isnan(values[1]).all(), "a NaN logit must be selected, never dropped"
    assert values[2, 0] == float("inf") and indices[2, 0] == 7
    y = mxd_fast.gather_combine(torch.randn(20, 5, generator=g).to(device), values, indices)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


def test_gradient_passes_at_a_selected_nan_logit(backend, device):
    """As through torch.relu: a NaN logit (here from a NaN bias, selected in every row) passes its
    gradient to x, weight and bias; the reference's gradients are finite and matched."""
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64).to(device) for s in ((5, 4), (9, 4), (9,)))
    b[3] = float("nan")
    dy = torch.randn(5, 2, generator=g, dtype=torch.float64).to(device)
    grads = []
    for fn in (mxd_fast.topk_gate, reference.topk_gate):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        values, indices = fn(*leaves, 2)
        assert (indices[:, 0] == 3).all()
        (values * dy).sum().backward()       # a NaN loss; its gradients are finite
        grads.append([t.grad for t in leaves])
    assert grads[1][2][3] != 0 and torch.isfinite(grads[1][2]).all()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
