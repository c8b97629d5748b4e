"""python ce.py RUN.pt [RUN.pt ...]: next-token CE on the trainer's held-out documents (EVAL_TOKENS, default
16384) with each layer saved by fit.py spliced in place of the MLP of layer $LAYER (default 6)."""
import sys, json, copy, torch
from mxd_fast import harvest as H
from mxd_fast.evaluate import evaluate
from mxd_fast.train import fold_scales
torch.set_num_threads(int(__import__('os').environ.get('THREADS', '2')))
model, tok = H.load_model(None)
docs, _ = H.default_corpus(print)
_, eval_docs = H.split_documents(docs, 0.02)
n_tokens = int(__import__('os').environ.get('EVAL_TOKENS', '16384'))
contexts = H.TokenStream(eval_docs, tok, 128, seed=12345, shuffle=False).next_contexts(n_tokens // 128)
for path in sys.argv[1:]:
    run = torch.load(path, weights_only=False)
    layer = fold_scales(copy.deepcopy(run['layer']), run['x_scale'], run['y_scale'])
    with torch.no_grad():
        m = evaluate(model, layer.eval(), int(__import__('os').environ.get('LAYER', '6')), contexts, batch=8)
    print(json.dumps({'run': path, **{k: v for k, v in m.items() if isinstance(v, (int, float))}}), flush=True)
