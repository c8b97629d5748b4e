"""python harvest.py TOKENS OUT.pt: the MLP input and output of layer $LAYER (default 6) of the embedded
SmolLM2-135M over TOKENS tokens of the training documents (contexts of 128, bf16), cached for fit.py."""
import os, sys, time, torch
from mxd_fast import harvest as H
torch.set_num_threads(2)
n_tokens = int(sys.argv[1]); out = sys.argv[2]
model, tok = H.load_model(None)
docs, corpus = H.default_corpus(print)
train_docs, _ = H.split_documents(docs, 0.02)
layer = int(os.environ.get('LAYER', '6'))
hv = H.Harvester(model, layer)
stream = H.TokenStream(train_docs, tok, 128, seed=0)
xs, ys = [], []; n = 0; t = time.time()
with torch.no_grad():
    while n < n_tokens:
        ids = stream.next_contexts(16)
        x, y = hv.harvest(ids)
        xs.append(x.reshape(-1, x.shape[-1]).to(torch.bfloat16)); ys.append(y.reshape(-1, y.shape[-1]).to(torch.bfloat16)); n += x.numel() // x.shape[-1]
print('harvested', n, time.time() - t, flush=True)
torch.save({'x': torch.cat(xs), 'y': torch.cat(ys), 'mlp': {k: v for k, v in H.find_mlp(model, layer)[2].state_dict().items()}}, out)
