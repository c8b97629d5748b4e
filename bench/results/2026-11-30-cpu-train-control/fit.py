"""python fit.py ARCH LR TOKENS K [SEED] [THREADS]: trains ARCH on the cached activations ($WORK/acts.pt; its
last 32768 rows held out) with the trainer's recipe (loss, AdamW, 10% linear warm-up, scalar normalisation,
expert renormalisation for MxD), batch 1024, the parameter budget of a width-32d transcoder; prints the
held-out NMSE along training and saves the layer for ce.py. ARCH: mlp (a dense SwiGLU MLP of the model's
own shape, trained from scratch), mxd, transcoder."""
import os, sys, time, json, torch, torch.nn as nn, torch.nn.functional as F
from mxd_fast import MxD
from mxd_fast.transcoder import TopKTranscoder
from mxd_fast.train import mxd_loss, size_for_budget, activation_scales
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
arch, lr, tokens, k = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
torch.manual_seed(seed)
data = torch.load(os.path.join(os.environ.get('WORK', '.'), 'acts.pt'))
X, Y = data['x'], data['y']
n_eval = 32768
Xe, Ye = X[-n_eval:].float(), Y[-n_eval:].float()
X, Y = X[:-n_eval], Y[:-n_eval]
xs, ys = activation_scales(X[:16384].float(), Y[:16384].float())
d, H, width = 576, 1536, 18432
class MLP(nn.Module):
    def __init__(s, h):
        super().__init__(); s.g = nn.Linear(d, h, bias=False); s.u = nn.Linear(d, h, bias=False); s.dn = nn.Linear(h, d, bias=False)
    def forward(s, x): return s.dn(F.silu(s.g(x)) * s.u(x))
if arch == 'mlp': layer = MLP(H)
elif arch == 'mlpwide': layer = MLP(21252672 // (3 * d))
elif arch == 'mxd':
    layer = MxD(d, H, d, size_for_budget('mxd', width, d, H, d, 'silu', True, k), k, activation='silu', glu=True); layer.normalize_experts()
else: layer = TopKTranscoder(d, width, d, k, skip=arch == 'skip')
opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
batch = 1024; steps = tokens // batch; warm = max(1, steps // 10)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
perm = torch.randperm(X.shape[0])
t0 = time.time(); curve = []
def fwd(x):
    return layer(x)
for s in range(steps):
    idx = perm[(s * batch) % X.shape[0]: (s * batch) % X.shape[0] + batch]
    x, y = X[idx].float() * xs, Y[idx].float() * ys
    if isinstance(layer, MxD): layer.normalize_experts()
    loss = mxd_loss(fwd(x), y)
    opt.zero_grad(); loss.backward()
    if isinstance(layer, MxD): layer.remove_parallel_gradient()
    opt.step(); sch.step()
    if (s + 1) % max(1, steps // 8) == 0 or s == steps - 1:
        with torch.no_grad():
            if isinstance(layer, MxD): layer.normalize_experts()
            err = en = 0.0
            for i in range(0, n_eval, 4096):
                yh = fwd(Xe[i:i+4096] * xs); yt = Ye[i:i+4096] * ys
                err += float(((yh - yt) ** 2).sum()); en += float((yt ** 2).sum())
        curve.append(((s + 1) * batch, round(err / en, 4)))
torch.save({'layer': layer, 'x_scale': xs, 'y_scale': ys}, os.path.join(os.environ.get('WORK', '.'), f'{arch}-{lr}-{tokens}-{k}-{seed}.pt'))
print(json.dumps({'arch': arch, 'lr': lr, 'k': k, 'tokens': tokens, 'seed': seed, 'eval_nmse': curve[-1][1], 'curve': curve, 's': round(time.time() - t0)}), flush=True)
