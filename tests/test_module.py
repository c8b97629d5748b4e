"""The MxD layer and the TopK transcoder: reference agreement, the paper's recipe, steering, torch.compile."""
import pytest
import torch

import mxd_fast
from mxd_fast import reference


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_in=12, d_hidden=10, d_out=9, n_experts=40, k=5)
    args.update(kw)
    layer = mxd_fast.MxD(**args).double()
    with torch.no_grad():                       # leave the zero init so every path carries signal
        layer.decoder.normal_()
        layer.bias.normal_()
        bound = layer.d_in ** -0.5
        for linear in (layer.encoder, layer.glu, layer.gate):
            if linear is not None:
                linear.bias.uniform_(-bound, bound)
        if layer.skip is not None:
            layer.skip.weight.normal_()
    return layer


def test_paper_initialisation():
    """Weights of encoder, glu and gate uniform in +-1/sqrt(d_in); every bias zero; expert rows U(-1, 1)
    scaled to unit norm; decoder and skip zero (so y = 0)."""
    torch.manual_seed(0)
    layer = mxd_fast.MxD(64, 32, 8, 1000, 4, glu=True, skip=True)
    torch.testing.assert_close(layer.experts.norm(dim=1), torch.ones(1000))
    assert torch.equal(layer.decoder, torch.zeros(32, 8)) and torch.equal(layer.bias, torch.zeros(8))
    assert torch.equal(layer.skip.weight, torch.zeros(8, 64))
    bound = 1 / 64 ** 0.5
    for name in ("encoder", "glu", "gate"):
        linear = getattr(layer, name)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias)), name
        w = linear.weight
        assert w.abs().max() <= bound and w.max() > 0.95 * bound and w.min() < -0.95 * bound, name
        assert abs(w.var().item() / (bound ** 2 / 3) - 1) < 0.1, name        # the variance of U(-b, b)
    assert torch.equal(layer(torch.randn(3, 64)), torch.zeros(3, 8))


def test_reset_parameters_draws_exactly_the_paper_initialisation():
    layer = mxd_fast.MxD(16, 32, 8, 100, 4, glu=True)
    torch.manual_seed(3)
    layer.reset_parameters()
    torch.manual_seed(3)
    bound = 1 / 16 ** 0.5
    expected = {"encoder.weight": torch.empty(32, 16).uniform_(-bound, bound),
                "glu.weight": torch.empty(32, 16).uniform_(-bound, bound),
                "gate.weight": torch.empty(100, 16).uniform_(-bound, bound)}
    experts = torch.empty(100, 8).uniform_(-1, 1)
    expected["experts"] = experts / experts.norm(dim=1, keepdim=True)
    for name, value in layer.state_dict().items():
        torch.testing.assert_close(value, expected.get(name, torch.zeros_like(value)), msg=name, rtol=0, atol=0)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_initialisation(skip):
    """Encoder weight uniform in +-1/sqrt(d_in), decoder uniform in +-1/sqrt(width), biases and skip zero
    (as in the docstring)."""
    tc = mxd_fast.TopKTranscoder(64, 500, 16, 8, skip=skip)
    torch.manual_seed(1)
    tc.reset_parameters()
    torch.manual_seed(1)
    bound = 1 / 64 ** 0.5
    expected = {"encoder.weight": torch.empty(500, 64).uniform_(-bound, bound)}
    expected["decoder"] = torch.empty(500, 16).uniform_(-1 / 500 ** 0.5, 1 / 500 ** 0.5)
    for name, value in tc.state_dict().items():
        torch.testing.assert_close(value, expected.get(name, torch.zeros_like(value)), msg=name, rtol=0, atol=0)
    w = tc.encoder.weight
    assert w.abs().max() <= bound and w.max() > 0.95 * bound and abs(w.var().item() / (bound ** 2 / 3) - 1) < 0.1
    doc = " ".join(mxd_fast.TopKTranscoder.__doc__.split())
    assert "decoder uniform in +-1/sqrt(width)" in doc and "b_enc and b_dec zero, and skip (if skip) zero" in doc


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "sigmoid"])
@pytest.mark.parametrize("glu,skip", [(False, False), (True, False), (False, True), (True, True)])
def test_forward_and_gradients_match_reference(activation, glu, skip):
    layer = _layer(activation=activation, glu=glu, skip=skip)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    dy = torch.randn(2, 7, 9, dtype=torch.float64)
    y = layer(x)
    (y * dy).sum().backward()
    fast = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    y_ref = reference.mxd_forward(layer, x)
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y, y_ref)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, msg=name)


def test_gradients_of_experts_and_gate_are_k_sparse():
    layer = _layer(n_experts=200, k=3)
    x = torch.randn(4, 12, dtype=torch.float64)
    layer(x).sum().backward()
    _, indices = layer.encode(x)[1:]
    selected = torch.zeros(200, dtype=torch.bool)
    selected[indices.reshape(-1)] = True
    assert (layer.experts.grad[~selected] == 0).all() and (layer.gate.weight.grad[~selected] == 0).all()


def test_steering_edits_the_coefficients():
    layer = _layer()
    x = torch.randn(6, 12, dtype=torch.float64)
    z, values, indices = layer.encode(x)
    extra = torch.full((6, 1), 7, dtype=torch.int64)          # an expert top-k may not have selected
    steered = layer.decode(x, z, torch.cat([values * 0.5, torch.full((6, 1), 100.0, dtype=values.dtype)], 1),
                           torch.cat([indices, extra], 1))
    a = reference.dense_coefficients(values * 0.5, indices, 40)
    a[:, 7] += 100.0
    expected = (a @ layer.experts) * (z @ layer.decoder) + layer.bias
    torch.testing.assert_close(steered, expected)


@pytest.mark.parametrize("make,n_name", [(_layer, "n_experts"), (lambda: mxd_fast.TopKTranscoder(12, 40, 9, 5), "width")])
def test_k_can_be_changed_and_is_checked(make, n_name):
    layer = make()
    x = torch.randn(3, 12, dtype=next(layer.parameters()).dtype)
    layer.k = 3
    assert layer.encode(x)[-1].shape == (3, 3) and "k=3" in repr(layer)
    for bad, error in ((41, ValueError), (0, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match=f"k must .*{n_name} = 40" if error is ValueError and bad else "k must"):
            layer.k = bad
    assert layer.k == 3


def test_normalize_and_remove_parallel_gradient():
    layer = _layer()
    with torch.no_grad():
        layer.experts.mul_(3.0)
    layer.normalize_experts()
    torch.testing.assert_close(layer.experts.norm(dim=1), torch.ones(40, dtype=torch.float64))
    layer.experts.grad = torch.randn_like(layer.experts)
    layer.remove_parallel_gradient()
    torch.testing.assert_close((layer.experts.grad * layer.experts).sum(1), torch.zeros(40, dtype=torch.float64))


def test_transcoder_matches_dense_form():
    torch.manual_seed(1)
    tc = mxd_fast.TopKTranscoder(12, 50, 9, 4, skip=True).double()
    with torch.no_grad():                       # leave the zero init so every path carries signal
        tc.skip.weight.normal_()
        tc.decoder.normal_()
        tc.bias.normal_()
        tc.encoder.bias.uniform_(-0.3, 0.3)
    x = torch.randn(5, 12, dtype=torch.float64)
    values, indices = reference.topk_gate(x, tc.encoder.weight, tc.encoder.bias, 4)
    expected = reference.gather_combine(tc.decoder, values, indices) + tc.bias + x @ tc.skip.weight.T
    torch.testing.assert_close(tc(x), expected)


def test_parameter_budget_matches_paper():
    # the paper's N for GPT-2 (21,490) and Pythia-1.4B (57,330), within the count of the biases
    assert abs(mxd_fast.mxd_experts_for_budget(768, 3072, 768, 24576) - 21490) < 20
    assert abs(mxd_fast.mxd_experts_for_budget(2048, 8192, 2048, 65536) - 57330) < 20
    with pytest.raises(ValueError, match="transcoder_width"):     # the dense part alone is larger
        mxd_fast.mxd_experts_for_budget(768, 3072, 768, 10)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    layer = _layer(glu=True, skip=True).float()
    x = torch.randn(3, 5, 12)
    compiled = torch.compile(layer, backend=compile_backend, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    y_eager = layer(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def _grads(layer, loss_fn):
    layer.zero_grad()
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_torch_compile_dynamic_shapes():
    """One compiled graph with a symbolic batch size serves several sizes, gradients included."""
    torch._dynamo.reset()
    layer = _layer(glu=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (3, 5, 11):
        x = torch.randn(rows, 12, dtype=torch.float64)
        fast = _grads(layer, lambda: compiled(x).square().sum())
        eager = _grads(layer, lambda: layer(x).square().sum())
        torch.testing.assert_close(compiled(x), layer(x))
        for name in fast:
            torch.testing.assert_close(fast[name], eager[name], msg=name)


def test_activation_checkpointing():
    layer = _layer(skip=True)
    x = torch.randn(4, 12, dtype=torch.float64)
    ckpt = _grads(layer, lambda: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).square().sum())
    plain = _grads(layer, lambda: layer(x).square().sum())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_export_with_a_dynamic_batch_matches_eager():
    layer = _layer(glu=True)
    x = torch.randn(7, 12, dtype=torch.float64)
    program = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: torch.export.Dim("tokens")}})
    for batch in (x, torch.randn(3, 12, dtype=torch.float64)):
        torch.testing.assert_close(program.module()(batch), layer(batch))


def test_vmap_matches_the_batched_call():
    layer = _layer()
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(layer)(x), layer(x))



@pytest.mark.filterwarnings("error:There is a performance drop")   # torch's per-sample vmap fallback
def test_vmap_rules_of_every_op():
    """Unbatched weights: the vmapped dimension is folded into the leading dimensions (any in_dim, a
    per-token argument unbatched); batched weights: one call per sample. Against per-sample calls."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)   # noqa: E731
    V, N = 3, 16
    w, dec, bias = rand(N, 8), rand(6, 8), rand(8)
    vals, idx = rand(4, V, 2), torch.randint(0, N, (4, V, 2), generator=g)
    z, x, gates = rand(4, V, 6), rand(4, V, 8), rand(V, N, 8)
    ops = {
        "gather_combine": (lambda v, i, wt: mxd_fast.gather_combine(wt, v, i), (vals, idx, w), (1, 1, None)),
        "gather_combine, unbatched indices": (lambda v, wt: mxd_fast.gather_combine(wt, v, idx[:, 0]), (vals, w), (1, None)),
        "gather_combine, batched weight": (lambda v, i, wt: mxd_fast.gather_combine(wt, v, i), (vals, idx, rand(V, N, 8)), (1, 1, 0)),
        "topk_gate": (lambda xx, gt: mxd_fast.topk_gate(xx, gt, None, 3), (x, gates[0]), (1, None)),
        "topk_gate, batched weight": (lambda xx, gt: mxd_fast.topk_gate(xx, gt, None, 3), (x, gates), (1, 0)),
        "mxd_decode": (lambda zz, v, i: mxd_fast.mxd_decode(zz, dec, w, v, i, bias), (z, vals, idx), (1, 1, 1)),
        "mxd_decode, batched bias": (lambda zz, b: mxd_fast.mxd_decode(zz, dec, w, vals[:, 0], idx[:, 0], b),
                                     (z, rand(V, 8)), (1, 0)),
    }
    for name, (fn, args, in_dims) in ops.items():
        batched = torch.func.vmap(fn, in_dims=in_dims)(*args)
        for b in range(V):
            expected = fn(*(a if d is None else a.select(d, b) for a, d in zip(args, in_dims)))
            got = tuple(o[b] for o in batched) if isinstance(batched, tuple) else batched[b]
            torch.testing.assert_close(got, expected, msg=f"{name}, sample {b}")
    assert torch.func.vmap(lambda v, i: mxd_fast.gather_combine(w, v, i))(vals[:0], idx[:0]).shape == (0, V, 8)


@pytest.mark.filterwarnings("error:There is a performance drop")
def test_jacobian_with_respect_to_the_input_calls_each_backward_op_once(monkeypatch):
    """jacrev(layer)(x) vmaps the backward ops over the output's cotangents; with no weight gradient asked
    for, each is folded into one call (a loop would call it once per output element)."""
    from mxd_fast.ops import _table
    calls = []
    real = _table.implementation
    monkeypatch.setattr(_table, "implementation", lambda op, direction, *a, **kw: (calls.append((op, direction)),
                                                                                  real(op, direction, *a, **kw))[1])
    layer = _layer()
    x = torch.randn(3, 12, dtype=torch.float64)
    jacobian = torch.func.jacrev(layer)(x)
    assert sorted(c for c in calls if c[1] == "backward") == [("mxd_decode", "backward"), ("topk_gate", "backward")]
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(layer, x))
    calls.clear()
    values, indices = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 40, (3, 4))
    combine = lambda v: mxd_fast.gather_combine(layer.experts.detach(), v, indices)   # noqa: E731
    jacobian = torch.func.jacrev(combine)(values)
    assert [c for c in calls if c[1] == "backward"] == [("gather_combine", "backward")]
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(combine, values))


@pytest.mark.filterwarnings("error:There is a performance drop")
def test_reverse_mode_torch_func_transforms_match_autograd():
    """torch.func.grad, vjp, jacrev and vmap(grad) (per-example gradients) through every op give what
    torch.autograd gives (the autograd.Function that register_autograd generates could not run under them)."""
    layer = _layer(skip=True)
    x = torch.randn(4, 12, dtype=torch.float64)
    params = dict(layer.named_parameters())

    def loss(p, inputs):
        return torch.func.functional_call(layer, p, (inputs,)).square().sum()

    layer.zero_grad()
    loss(params, x).backward()
    grads = torch.func.grad(loss)({n: p.detach() for n, p in params.items()}, x)
    for n, p in params.items():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
    for n, p in params.items():
        torch.testing.assert_close(per_example[n].sum(0), p.grad, msg=n)
    jacobian = torch.func.jacrev(layer)(x[0])
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(layer, x[0]))
    dy = torch.randn(4, 9, dtype=torch.float64)
    _, pullback = torch.func.vjp(layer, x)
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(pullback(dy)[0], torch.autograd.grad(layer(xr), xr, dy)[0])
    with pytest.raises(RuntimeError, match="mxd_fast.*no derivative"):
        torch.func.grad(lambda inputs: torch.func.grad(lambda t: layer(t).square().sum())(inputs).sum())(x)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "forward_ad"])
def test_forward_mode_ad_raises(transform):
    """Every op refuses forward-mode tangents instead of returning zeros; an op whose inputs carry
    no tangent (here the gate, fed a constant) still runs inside the transform."""
    import torch.autograd.forward_ad as fwAD
    layer = _layer()
    x = torch.randn(4, 12, dtype=torch.float64)
    w, v, i = layer.experts.detach(), torch.randn(4, 3, dtype=torch.float64), torch.tensor([[0, 1, 2]] * 4)
    calls = {"topk_gate": lambda x: mxd_fast.topk_gate(x, layer.gate.weight.detach(), None, 3)[0],
             "gather_combine": lambda v: mxd_fast.gather_combine(w, v, i),
             "mxd_decode": lambda v: mxd_fast.mxd_decode(x[:, :10], layer.decoder.detach(), w, v, i, None)}
    for name, fn in calls.items():
        arg = x if name == "topk_gate" else v
        with pytest.raises(NotImplementedError, match=f"mxd_fast.{name} has no forward-mode derivative"):
            if transform == "jvp":
                torch.func.jvp(fn, (arg,), (torch.ones_like(arg),))
            elif transform == "jacfwd":
                torch.func.jacfwd(fn)(arg)
            else:
                with fwAD.dual_level():
                    fn(fwAD.make_dual(arg, torch.ones_like(arg)))
    _, tangent = torch.func.jvp(lambda v: layer(x) * v.sum(), (v,), (torch.ones_like(v),))
    torch.testing.assert_close(tangent, layer(x) * 12)

def test_second_order_gradients_raise():
    layer = _layer()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="mxd_fast.*no derivative"):
        gx.sum().backward()


@pytest.mark.parametrize("kwargs,error", [
    (dict(k=0), ValueError), (dict(k=41), ValueError), (dict(k=2.0), TypeError), (dict(d_in=0), ValueError),
    (dict(activation="tanh"), ValueError), (dict(activation=["relu"]), ValueError), (dict(n_experts=True), TypeError),
    (dict(glu="no"), TypeError), (dict(skip=1), TypeError), (dict(dtype=torch.int32), TypeError),
    (dict(dtype=torch.complex64), TypeError),
])
def test_bad_arguments(kwargs, error):
    args = dict(d_in=12, d_hidden=10, d_out=9, n_experts=40, k=5)
    args.update(kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        mxd_fast.MxD(**args)


@pytest.mark.parametrize("kwargs,error", [
    (dict(skip="no"), TypeError), (dict(dtype=torch.int64), TypeError), (dict(width=0), ValueError),
])
def test_bad_transcoder_arguments(kwargs, error):
    args = dict(d_in=12, width=40, d_out=9, k=5)
    args.update(kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        mxd_fast.TopKTranscoder(**args)


@pytest.mark.parametrize("kwargs,error", [
    (dict(transcoder_width=3000.0), TypeError), (dict(d_in=0), ValueError), (dict(d_hidden=-1), ValueError),
])
def test_bad_budget_arguments(kwargs, error):
    args = dict(d_in=768, d_hidden=3072, d_out=768, transcoder_width=24576)
    args.update(kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        mxd_fast.mxd_experts_for_budget(**args)


@pytest.mark.parametrize("make", [_layer, lambda: mxd_fast.TopKTranscoder(12, 40, 9, 5, dtype=torch.float64)])
def test_wrong_input(make):
    layer = make()
    with pytest.raises(ValueError, match="d_in"):
        layer(torch.randn(3, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have last dimension d_in = 12, got shape \\(\\)"):
        layer(torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        layer([[0.0] * 12])


@pytest.mark.parametrize("make,match", [
    (lambda: mxd_fast.MxD(4, 4, 4, 2 ** 62, 2, device="meta"), "n_experts = 4611686018427387904"),
    (lambda: mxd_fast.MxD(4, 4, 4, 2 ** 70, 2 ** 70, device="meta"), "n_experts = 1180591620717411303424"),
    (lambda: mxd_fast.MxD(4, 2 ** 62, 4, 10, 2, device="meta"), "d_hidden = 4611686018427387904"),
    (lambda: mxd_fast.MxD(1, 1, 1, 2 ** 61, 1, device="meta"), "n_experts = 2305843009213693952"),  # 2**63 bytes
    (lambda: mxd_fast.MxD(2 ** 62, 4, 4, 10, 2, dtype=torch.float16, device="meta"), "d_in = 4611686018427387904"),
    (lambda: mxd_fast.TopKTranscoder(4, 2 ** 64, 4, 2, device="meta"), "width = 18446744073709551616"),
    (lambda: mxd_fast.TopKTranscoder(4, 10, 2 ** 62, 2, device="meta"), "d_out = 4611686018427387904"),
])
def test_sizes_too_large_for_a_tensor_name_the_argument(make, match):
    # checked before anything is allocated (torch says "Overflow when unpacking long long" or
    # "Storage size calculation overflowed", naming no argument)
    with pytest.raises(ValueError, match=f"{match}.*more than a torch tensor can hold"):
        make()


@pytest.mark.parametrize("error", [RuntimeError, torch.OutOfMemoryError])
@pytest.mark.parametrize("make,largest", [
    (lambda: mxd_fast.MxD(12, 10, 9, 40, 5, glu=True, skip=True),
     r"gate.weight \[n_experts = 40, d_in = 12\], 1,920 bytes"),
    (lambda: mxd_fast.TopKTranscoder(12, 40, 9, 5), r"encoder.weight \[width = 40, d_in = 12\], 1,920 bytes"),
])
def test_allocation_failure_names_the_sizes_and_bytes(make, largest, error, monkeypatch):
    layer = make()
    total = sum(p.numel() * p.element_size() for p in layer.parameters())
    empty = torch.empty

    def failing_empty(*size, **kwargs):   # the allocator failing on the tensors of 40 rows
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        if 40 in tuple(shape):
            raise error("DefaultCPUAllocator: can't allocate memory")
        return empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", failing_empty)
    with pytest.raises(error, match=f"^{type(layer).__name__}: could not allocate its parameters, {total:,} bytes "
                                    f"in all .*{largest}.*can't allocate memory") as info:
        make()
    assert type(info.value) is error
    assert isinstance(info.value.__cause__, error)    # the allocator's error, chained


def test_other_errors_during_construction_pass_unchanged(monkeypatch):
    def failing_empty(*size, **kwargs):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(torch, "empty", failing_empty)
    with pytest.raises(NotImplementedError, match="^no kernel$"):
        mxd_fast.MxD(12, 10, 9, 40, 5)


def test_a_hook_on_the_gate_fires_and_sees_the_coefficients():
    # the gate is a module whose forward is the fused top-k gate: as the class docstring says
    layer = _layer()
    x = torch.randn(3, 12, dtype=torch.float64)
    seen = []
    handles = [layer.gate.register_forward_hook(lambda m, a, out: seen.append(("gate", out))),
               layer.register_forward_hook(lambda *a: seen.append(("layer", None)))]
    try:
        layer(x)
    finally:
        for h in handles:
            h.remove()
    assert [name for name, _ in seen] == ["gate", "layer"]
    values, indices = seen[0][1]
    assert isinstance(seen[0][1], mxd_fast.Coefficients) and seen[0][1].indices is indices
    _, enc_values, enc_indices = layer.encode(x)
    assert torch.equal(values, enc_values) and torch.equal(indices, enc_indices)
    expected = torch.relu(x @ layer.gate.weight.T + layer.gate.bias).topk(5, dim=-1)
    torch.testing.assert_close(values.sort(-1).values, expected.values.sort(-1).values)
    doc = " ".join(mxd_fast.MxD.__doc__.split())
    assert "a forward hook on `gate` fires and sees, and may replace, Coefficients(values, indices)" in doc


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("compile_backend", [None, "aot_eager", "inductor"])
def test_autocast_bf16(compile_backend, backward_inside):
    """Under torch.autocast the ops cast to the autocast dtype; fp32 weights get fp32 gradients, also
    when backward() runs inside the autocast region (the backward ops then must not autocast inside)."""
    torch._dynamo.reset()
    layer = _layer(glu=True).float()
    x = torch.randn(4, 6, 12)
    fn = layer if compile_backend is None else torch.compile(layer, backend=compile_backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x)
        if backward_inside:
            y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    if not backward_inside:
        y.float().square().sum().backward()
    fast = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    y_ref = reference.mxd_forward(layer, x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2 * y_ref.abs().max().item())
    for name, p in layer.named_parameters():
        assert fast[name].dtype == torch.float32, name
        scale = p.grad.abs().max().item() + 1e-6
        torch.testing.assert_close(fast[name], p.grad, rtol=0.1, atol=0.1 * scale, msg=name)


def test_float64_is_left_alone_by_autocast():
    """ATen's autocast casts no float64 tensor; neither do the ops."""
    layer = _layer(glu=True)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_under_autocast_returns_the_autocast_dtype(skip):
    """Like MxD and nn.Linear: the output in the autocast dtype, fp32 gradients for fp32 parameters."""
    torch.manual_seed(0)
    tc = mxd_fast.TopKTranscoder(12, 40, 9, 5, skip=skip)
    with torch.no_grad():
        tc.bias.normal_()
    x = torch.randn(4, 6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tc(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in tc.parameters() if p.grad is not None)
    # against fp32 on the latents autocast selected (bf16 rounding may swap a near-tie at the k-th latent)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, indices = tc.encode(x)
    with torch.no_grad():
        values = torch.relu(torch.einsum("bti,btki->btk", x, tc.encoder.weight[indices]) + tc.encoder.bias[indices])
        want = tc.decode(x, values, indices)
    torch.testing.assert_close(y.float(), want, rtol=5e-2, atol=5e-2)


def _cuda_backend_or_skip(name):
    from mxd_fast.backend import unavailable_reason
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = unavailable_reason(name, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


def _cuda_layer():
    return _layer(d_in=64, d_hidden=96, d_out=48, n_experts=300, k=8).float().cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_cuda_graph_replays_a_training_step(name, monkeypatch):
    """A forward + backward captured in a CUDA graph (index checks on every call, which capture skips)
    replays to eager's outputs and gradients on new inputs."""
    import copy
    _cuda_backend_or_skip(name)
    monkeypatch.setenv("MXD_FAST_CHECK_INDICES", "always")
    layer = _cuda_layer()
    static_x = torch.randn(37, 64, device="cuda")
    with mxd_fast.use_backend(name):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                   # warm-up (autotuning, first-call checks) off the graph
            for _ in range(3):
                layer.zero_grad(set_to_none=True)
                layer(static_x).square().sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        layer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
            static_y.square().sum().backward()
        for seed in range(2):
            x = torch.randn(37, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            static_x.copy_(x)
            graph.replay()
            eager = copy.deepcopy(layer)
            eager.zero_grad(set_to_none=True)
            y = eager(x)
            y.square().sum().backward()
            torch.testing.assert_close(static_y, y)
            for (name_, p), q in zip(layer.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, msg=name_)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_compile_reduce_overhead_matches_eager(name):
    """torch.compile(mode="reduce-overhead") (inductor with CUDA graphs) gives eager's outputs and gradients."""
    _cuda_backend_or_skip(name)
    torch._dynamo.reset()
    layer = _cuda_layer()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with mxd_fast.use_backend(name):
        for seed in range(4):
            x = torch.randn(37, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            layer.zero_grad(set_to_none=True)
            y = compiled(x)
            y.square().sum().backward()
            got = [y.detach().clone()] + [p.grad.clone() for p in layer.parameters()]
            layer.zero_grad(set_to_none=True)
            y = layer(x)
            y.square().sum().backward()
            want = [y.detach()] + [p.grad for p in layer.parameters()]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_layer_on_a_device_other_than_the_current_one(name):
    """Tensors on cuda:1 while cuda:0 is current: every backend launches on the tensors' device."""
    _cuda_backend_or_skip(name)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    layer = _cuda_layer()
    other = _layer(d_in=64, d_hidden=96, d_out=48, n_experts=300, k=8).float().to("cuda:1")
    x = torch.randn(37, 64, device="cuda:0")
    with torch.cuda.device(0), mxd_fast.use_backend(name):
        for module, inp in ((layer, x), (other, x.to("cuda:1"))):
            module(inp).square().sum().backward()
    torch.testing.assert_close(other.gate.weight.grad.cpu(), layer.gate.weight.grad.cpu())
    torch.testing.assert_close(other.experts.grad.cpu(), layer.experts.grad.cpu())
