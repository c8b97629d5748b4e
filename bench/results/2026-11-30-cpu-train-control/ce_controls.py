"""python ce_controls.py [ALPHA:NOISE_NMSE ...]: next-token CE on the same held-out tokens as ce.py with the real MLP of layer 6 spliced in, its output scaled by alpha and/or with Gaussian noise of a given NMSE added (per token, scaled to the token's output RMS)."""
import sys, json, torch, os
from torch import nn
from mxd_fast import harvest as H
from mxd_fast.evaluate import evaluate
torch.set_num_threads(2)
model, tok = H.load_model(None)
docs, _ = H.default_corpus(print)
_, eval_docs = H.split_documents(docs, 0.02)
contexts = H.TokenStream(eval_docs, tok, 128, seed=12345, shuffle=False).next_contexts(16384 // 128)
mlp = H.find_mlp(model, 6)[2]
import copy
mlp_copy = copy.deepcopy(mlp)

class Scaled(nn.Module):
    def __init__(self, alpha, noise=0.0):
        super().__init__(); self.alpha, self.noise = alpha, noise
        self.g = torch.Generator().manual_seed(0)
    def forward(self, x):
        y = mlp_copy(x)
        if self.noise:
            rms = y.pow(2).mean(-1, keepdim=True).sqrt()
            y = y + torch.randn(y.shape, generator=self.g) * rms * self.noise ** 0.5
        return self.alpha * y
configs = [tuple(map(float, a.split(':'))) for a in sys.argv[1:]] or [(1.0, 0.0), (0.9, 0.0), (0.8, 0.0), (1.0, 0.15), (0.85, 0.0)]
for alpha, noise in configs:  # argv: ALPHA:NOISE_NMSE ...
    with torch.no_grad():
        m = evaluate(model, Scaled(alpha, noise), 6, contexts, batch=8)
    print(json.dumps({"alpha": alpha, "noise_nmse": noise, **{k: round(v, 5) for k, v in m.items() if isinstance(v, float)}}), flush=True)
