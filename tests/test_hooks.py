"""Hook points of MxD and TopKTranscoder, the hooked gate, and steering, against the dense reference."""
import pytest
import torch

import mxd_fast
from mxd_fast import reference
from mxd_fast.hooks import HookPoint


def _mxd(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_in=12, d_hidden=10, d_out=9, n_experts=40, k=5)
    args.update(kw)
    layer = mxd_fast.MxD(**args).double()
    with torch.no_grad():                       # leave the zero init so every path carries signal
        layer.decoder.normal_()
        layer.bias.normal_()
        for linear in (layer.encoder, layer.glu, layer.gate):
            if linear is not None:
                linear.bias.uniform_(-0.3, 0.3)
        if layer.skip is not None:
            layer.skip.weight.normal_()
    return layer


def _transcoder(seed=0, skip=False):
    torch.manual_seed(seed)
    tc = mxd_fast.TopKTranscoder(12, 40, 9, 5, skip=skip).double()
    with torch.no_grad():
        tc.decoder.normal_()
        tc.bias.normal_()
        tc.encoder.bias.uniform_(-0.3, 0.3)
        if tc.skip is not None:
            tc.skip.weight.normal_()
    return tc


def _x(rows=6):
    return torch.randn(rows, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _mxd_dense(layer, x, edit=lambda a: a):
    """The paper's dense MxD with the dense coefficient vector a [..., N] passed through `edit`."""
    values, indices = reference.topk_gate(x, layer.gate.weight, layer.gate.bias, layer.k)
    a = edit(reference.dense_coefficients(values, indices, layer.n_experts))
    y = (a @ layer.experts) * (layer.hidden(x) @ layer.decoder) + layer.bias
    return y if layer.skip is None else y + layer.skip(x)


def _transcoder_dense(tc, x, edit=lambda a: a):
    values, indices = reference.topk_gate(x, tc.encoder.weight, tc.encoder.bias, tc.k)
    y = edit(reference.dense_coefficients(values, indices, tc.width)) @ tc.decoder + tc.bias
    return y if tc.skip is None else y + tc.skip(x)


def _add(n, c):
    def edit(a):
        a = a.clone()
        a[..., n] += c
        return a
    return edit


# ---- HookPoint ---------------------------------------------------------------------------------

def test_hook_point_passes_values_through_and_hooks_read_or_replace_them():
    point = HookPoint()
    x = torch.randn(3)
    assert point(x) is x and not point.hooked
    seen = []
    with point.register_forward_hook(lambda m, args, out: seen.append(out)):      # None: value unchanged
        assert point.hooked and point(x) is x and seen == [x]
    assert not point.hooked
    handle = point.register_forward_hook(lambda m, args, out: out * 2)
    pre = point.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    torch.testing.assert_close(point(x), (x + 1) * 2)
    handle.remove()
    assert point.hooked                                                          # the pre-hook is left
    pre.remove()
    assert not point.hooked and point(x) is x


def test_unhooked_points_and_gate_are_not_dispatched(monkeypatch):
    """A hook point or gate without hooks is never called as a module (no hook dispatch)."""
    calls = []
    for cls in (HookPoint, mxd_fast.TopKGate):
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _real=real: (calls.append(type(self)), _real(self, *a))[1])
    layer, tc, x = _mxd(), _transcoder(), _x()
    y, y_tc = layer(x), tc(x)
    assert calls == []
    with layer.hook_z.register_forward_hook(lambda *a: None), layer.gate.register_forward_hook(lambda *a: None):
        torch.testing.assert_close(layer(x), y)
    assert calls == [mxd_fast.TopKGate, HookPoint]
    calls.clear()
    with tc.encoder.register_forward_hook(lambda *a: None), tc.hook_out.register_forward_hook(lambda *a: None):
        torch.testing.assert_close(tc(x), y_tc)
    assert calls == [mxd_fast.TopKGate, HookPoint]


def test_backward_hooks_on_a_hook_point_see_the_gradient():
    layer, x = _mxd(), _x()
    dy = torch.randn(6, 9, dtype=torch.float64)
    seen = []
    with layer.hook_z.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(grad_out[0])):
        (layer(x) * dy).sum().backward()
    values, indices = layer.encode(x)[1:]
    a = reference.dense_coefficients(values, indices, 40)
    torch.testing.assert_close(seen[0], ((a @ layer.experts) * dy) @ layer.decoder.T)   # dL/dz
    assert not layer.hook_z.hooked


# ---- MxD ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("glu,skip", [(False, False), (True, True)])
def test_mxd_hook_points_see_z_coefficients_and_output(glu, skip):
    layer, x = _mxd(glu=glu, skip=skip), _x()
    z, values, indices = layer.encode(x)
    y = layer(x)
    seen = {}
    names = ("hook_z", "hook_experts", "hook_out")
    handles = [getattr(layer, n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out)) for n in names]
    torch.testing.assert_close(layer(x), y)
    for h in handles:
        h.remove()
    assert isinstance(seen["hook_experts"], mxd_fast.Coefficients)
    torch.testing.assert_close(seen["hook_z"], layer.hidden(x))
    assert torch.equal(seen["hook_experts"].values, values) and torch.equal(seen["hook_experts"].indices, indices)
    torch.testing.assert_close(seen["hook_out"], _mxd_dense(layer, x))


def test_mxd_hooks_replace_z_coefficients_and_output():
    layer, x = _mxd(skip=True), _x()
    with layer.hook_z.register_forward_hook(lambda m, a, z: torch.zeros_like(z)):
        torch.testing.assert_close(layer(x), (layer.bias + layer.skip(x)).expand(6, 9))

    def two_more(m, a, coefficients):   # halve the values, add experts 3 and 7 with values 2 and -1
        values, indices = coefficients
        extra = torch.tensor([[2.0, -1.0]], dtype=values.dtype).expand(values.shape[0], 2)
        return mxd_fast.Coefficients(torch.cat([values * 0.5, extra], -1),
                                     torch.cat([indices, torch.tensor([[3, 7]]).expand(values.shape[0], 2)], -1))

    with layer.hook_experts.register_forward_hook(two_more):
        assert layer.encode(x)[1].shape == (6, 7)
        torch.testing.assert_close(layer(x), _mxd_dense(layer, x, lambda a: _add(7, -1.0)(_add(3, 2.0)(a * 0.5))))
    with layer.hook_out.register_forward_hook(lambda m, a, y: -y):
        torch.testing.assert_close(layer(x), -_mxd_dense(layer, x))
    with layer.gate.register_forward_hook(lambda m, a, c: mxd_fast.Coefficients(c.values * 3, c.indices)):
        torch.testing.assert_close(layer(x), _mxd_dense(layer, x, lambda a: a * 3))


def test_encode_and_decode_pass_through_the_same_hooks_as_forward():
    layer, x = _mxd(), _x()
    with layer.hook_experts.register_forward_hook(lambda m, a, c: (c.values + 1, c.indices)), \
            layer.hook_z.register_forward_hook(lambda m, a, z: z * 2), \
            layer.hook_out.register_forward_hook(lambda m, a, y: y - 1):
        torch.testing.assert_close(layer.decode(x, *layer.encode(x)), layer(x))
        expected = _mxd_dense(layer, x, lambda a: a + reference.dense_coefficients(
            torch.ones(6, 5, dtype=torch.float64), layer.gate(x).indices, 40)) * 2 - 1 - layer.bias
        torch.testing.assert_close(layer(x), expected)


def test_hooks_on_encoder_and_glu_see_their_pre_activations():
    layer, x = _mxd(glu=True), _x()
    seen = {}
    with layer.encoder.register_forward_hook(lambda m, a, out: seen.__setitem__("encoder", out)), \
            layer.glu.register_forward_hook(lambda m, a, out: seen.__setitem__("glu", out)):
        layer(x)
    torch.testing.assert_close(seen["encoder"], x @ layer.encoder.weight.T + layer.encoder.bias)
    torch.testing.assert_close(seen["glu"], x @ layer.glu.weight.T + layer.glu.bias)


@pytest.mark.parametrize("bad", [torch.zeros(6, 5), (torch.zeros(6, 5),), [1, 2]])
def test_a_hook_passing_on_no_coefficient_pair_is_refused_by_name(bad):
    layer, tc, x = _mxd(), _transcoder(), _x()
    with layer.hook_experts.register_forward_hook(lambda *a: bad):
        with pytest.raises(TypeError, match="hooks on gate and hook_experts must pass on a pair of tensors"):
            layer(x)
    with tc.encoder.register_forward_hook(lambda *a: bad):
        with pytest.raises(TypeError, match="hooks on encoder and hook_latents must pass on a pair of tensors"):
            tc(x)


# ---- TopKTranscoder ----------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_hooks_see_and_replace_latents_and_output(skip):
    tc, x = _transcoder(skip=skip), _x()
    values, indices = tc.encode(x)
    seen = {}
    with tc.encoder.register_forward_hook(lambda m, a, out: seen.__setitem__("encoder", out)), \
            tc.hook_latents.register_forward_hook(lambda m, a, out: seen.__setitem__("latents", out)), \
            tc.hook_out.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out)):
        tc(x)
    for name in ("encoder", "latents"):
        assert isinstance(seen[name], mxd_fast.Coefficients)
        assert torch.equal(seen[name].values, values) and torch.equal(seen[name].indices, indices)
    torch.testing.assert_close(seen["out"], _transcoder_dense(tc, x))
    with tc.hook_latents.register_forward_hook(lambda m, a, c: (torch.cat([c.values, c.values[:, :1]], -1),
                                                                 torch.cat([c.indices, c.indices[:, :1] * 0 + 11], -1))):
        extra = lambda a: a + torch.nn.functional.one_hot(torch.tensor(11), 40) * values[:, :1]   # noqa: E731
        torch.testing.assert_close(tc(x), _transcoder_dense(tc, x, extra))
    with tc.hook_out.register_forward_hook(lambda m, a, y: y * 0):
        torch.testing.assert_close(tc(x), torch.zeros(6, 9, dtype=torch.float64))
    doc = " ".join(mxd_fast.TopKTranscoder.__doc__.split())
    assert "a forward hook on `encoder` fires and sees, and may replace, Coefficients(values, indices)" in doc


# ---- steering ----------------------------------------------------------------------------------

def _selected_somewhere_not_everywhere(indices):
    n = int(indices[0, 0])
    selected = (indices == n).any(-1)
    assert selected.any() and not selected.all()
    return n


@pytest.mark.parametrize("glu,skip", [(False, False), (True, True)])
def test_steering_an_mxd_expert_matches_the_dense_edit(glu, skip):
    """+c on expert n's coefficient at every position (selected there or not), outputs and gradients."""
    layer, x = _mxd(glu=glu, skip=skip), _x()
    n = _selected_somewhere_not_everywhere(layer.encode(x)[2])
    for expert in (n, 31):
        with mxd_fast.steer(layer, expert=expert, scale=8.0):
            y = layer(x)
            steered = layer.encode(x)
        y.square().sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        layer.zero_grad()
        expected = _mxd_dense(layer, x, _add(expert, 8.0))
        expected.square().sum().backward()
        torch.testing.assert_close(y, expected)
        for name, p in layer.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, msg=name)
        layer.zero_grad()
        values, indices = steered[1:]
        assert indices.shape == (6, 6) and ((indices == expert).sum(-1) <= 2).all()
        assert ((values * (indices == expert)).sum(-1) > 8.0 - 1e-12).all()
    assert not layer.hook_experts.hooked
    torch.testing.assert_close(layer(x), _mxd_dense(layer, x))     # the block's end removes the hook


def test_steering_nests_and_adds_once_to_an_expert_listed_twice():
    layer, x = _mxd(), _x()
    n = _selected_somewhere_not_everywhere(layer.encode(x)[2])
    with mxd_fast.steer(layer, expert=3, scale=-2.5), mxd_fast.steer(layer, expert=n, scale=100.0):
        torch.testing.assert_close(layer(x), _mxd_dense(layer, x, lambda a: _add(n, 100.0)(_add(3, -2.5)(a))))
    doubled = layer.hook_experts.register_forward_hook(lambda m, a, c: (c.values.repeat(1, 2), c.indices.repeat(1, 2)))
    with mxd_fast.steer(layer, expert=n, scale=4.0):
        torch.testing.assert_close(layer(x), _mxd_dense(layer, x, lambda a: _add(n, 4.0)(a * 2)))
    doubled.remove()


@pytest.mark.parametrize("skip", [False, True])
def test_steering_a_transcoder_latent_matches_the_dense_edit(skip):
    tc, x = _transcoder(skip=skip), _x()
    n = _selected_somewhere_not_everywhere(tc.encode(x)[1])
    for latent in (n, 0):
        with mxd_fast.steer(tc, expert=latent, scale=-3.0):
            torch.testing.assert_close(tc(x), _transcoder_dense(tc, x, _add(latent, -3.0)))
    torch.testing.assert_close(tc(x), _transcoder_dense(tc, x))


def test_steering_under_bf16_autocast_keeps_the_dtypes():
    layer = _mxd().float()
    x = _x().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, values, indices = layer.encode(x)
        expert = next(n for n in range(40) if not (indices == n).any())
        with mxd_fast.steer(layer, expert=expert, scale=2.0):
            y = layer(x)
            steered = layer.encode(x)
        expected = layer.decode(x, z, torch.cat([values, torch.full_like(values[:, :1], 2.0)], -1),
                                torch.cat([indices, torch.full_like(indices[:, :1], expert)], -1))
    assert y.dtype == steered[1].dtype == torch.bfloat16 and steered[2].dtype == torch.int64
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(expert=40, scale=1.0), ValueError, "expert must satisfy 0 <= expert < 40"),
    (dict(expert=-1, scale=1.0), ValueError, "expert"),
    (dict(expert=2.0, scale=1.0), TypeError, "expert must be an int"),
    (dict(expert=True, scale=1.0), TypeError, "expert"),
    (dict(expert=2, scale="8"), TypeError, "scale must be a real number"),
    (dict(expert=2, scale=float("nan")), ValueError, "scale must be finite"),
])
def test_steer_refuses_bad_arguments_by_name(kwargs, error, match):
    layer = _mxd()
    with pytest.raises(error, match=match):
        with mxd_fast.steer(layer, **kwargs):
            pass
    assert not layer.hook_experts.hooked
    with pytest.raises(TypeError, match="layer must be an mxd_fast.MxD or mxd_fast.TopKTranscoder"):
        with mxd_fast.steer(torch.nn.Linear(3, 3), expert=0, scale=1.0):
            pass


# ---- torch.compile ------------------------------------------------------------------------------

def test_compiled_layer_matches_eager_with_and_without_hooks():
    """fullgraph compile (aot_eager) equals eager: without hooks, with a hook registered before compiling,
    and with hooks (steer, the gate's) registered after compiling, which it sees, and after their removal."""
    torch._dynamo.reset()
    layer, x = _mxd(glu=True, skip=True).float(), _x().float()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    plain = layer(x)
    torch.testing.assert_close(compiled(x), plain)
    with mxd_fast.steer(compiled, expert=9, scale=5.0):
        torch.testing.assert_close(compiled(x), layer(x))
        torch.testing.assert_close(compiled(x), _mxd_dense(layer, x, _add(9, 5.0)))
    with layer.gate.register_forward_hook(lambda m, a, c: (c.values * 0, c.indices)):
        torch.testing.assert_close(compiled(x), layer(x))
        torch.testing.assert_close(compiled(x), (layer.bias + layer.skip(x)).expand_as(plain))
    with layer.hook_out.register_forward_hook(lambda m, a, y: y + 1):
        torch.testing.assert_close(compiled(x), plain + 1)
    torch.testing.assert_close(compiled(x), plain)

    torch._dynamo.reset()
    with layer.hook_z.register_forward_hook(lambda m, a, z: z.flip(-1)):
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        y = compiled(x)
        y.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        layer.zero_grad()
        y_eager = layer(x)
        y_eager.square().sum().backward()
        torch.testing.assert_close(y, y_eager)
        assert not torch.allclose(y, plain)
        for name, p in layer.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, msg=name)
    torch.testing.assert_close(compiled(x), plain)


def test_compiled_transcoder_sees_steering_registered_after_compiling():
    torch._dynamo.reset()
    tc, x = _transcoder(skip=True).float(), _x().float()
    compiled = torch.compile(tc, backend="aot_eager", fullgraph=True)
    plain = compiled(x)
    with mxd_fast.steer(tc, expert=4, scale=3.0):
        torch.testing.assert_close(compiled(x), tc(x))
        assert not torch.allclose(compiled(x), plain)
    torch.testing.assert_close(compiled(x), plain)


def test_export_with_a_steering_hook():
    layer, x = _mxd(), _x()
    with mxd_fast.steer(layer, expert=2, scale=1.5):
        program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), _mxd_dense(layer, x, _add(2, 1.5)))
