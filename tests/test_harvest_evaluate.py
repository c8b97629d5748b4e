"""Argument checks of harvesting and evaluation on a tiny randomly initialised GPT-2 (16 positions):
contexts without a token to predict, contexts longer than the model's positions, empty batches, batch
sizes; and the text loader's file suffixes."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mxd_fast import MxD  # noqa: E402
from mxd_fast import harvest as H  # noqa: E402
from mxd_fast.evaluate import cross_entropy, evaluate  # noqa: E402

POSITIONS, VOCAB, D = 16, 50, 32


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=2, n_positions=POSITIONS, vocab_size=VOCAB,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _layer():
    return MxD(D, 64, D, 8, 2, activation="gelu_tanh")


def _ids(n, length):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", [(0, 8), (4, 1), (3, 0)])
def test_no_token_to_predict_is_an_error_not_a_perfect_score(gpt2, shape):
    # the cross-entropies used to come out 0.0, as if the model were perfect
    contexts = torch.zeros(shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"contexts \(shape .*\) has no token to predict"):
        evaluate(gpt2, _layer(), 1, contexts)
    with pytest.raises(ValueError, match=r"contexts \(shape .*\) has no token to predict"):
        cross_entropy(gpt2, contexts)


@pytest.mark.parametrize("batch,error", [(0, ValueError), (-2, ValueError), (2.0, TypeError)])
def test_batch_must_be_a_positive_int(gpt2, batch, error):
    with pytest.raises(error, match="batch"):
        evaluate(gpt2, _layer(), 1, _ids(2, 8), batch=batch)
    with pytest.raises(error, match="batch"):
        cross_entropy(gpt2, _ids(2, 8), batch=batch)


def test_contexts_longer_than_the_model_positions(gpt2):
    long = _ids(1, POSITIONS + 1)
    match = f"contexts of {POSITIONS + 1} tokens .* longer than the model's {POSITIONS} positions"
    with pytest.raises(ValueError, match=f"^contexts: {match}"):
        evaluate(gpt2, _layer(), 1, long)
    with pytest.raises(ValueError, match=f"^contexts: {match}"):
        cross_entropy(gpt2, long)
    with H.Harvester(gpt2, 1) as harvester:
        with pytest.raises(ValueError, match=f"^input_ids: {match}"):
            harvester.harvest(long)
        with pytest.raises(ValueError, match=f"^input_ids: {match}"):
            harvester.run_and_capture(long)
        # exactly the model's positions is fine
        x, y = harvester.harvest(_ids(2, POSITIONS))
        assert x.shape == y.shape == (2 * POSITIONS, D)
    metrics = evaluate(gpt2, _layer(), 1, _ids(3, POSITIONS), batch=2)
    assert metrics["eval_tokens"] == 3 * (POSITIONS - 1) and metrics["ce_clean"] > 0


def test_harvest_refuses_an_empty_batch_and_a_flat_tensor(gpt2):
    with H.Harvester(gpt2, 0) as harvester:
        with pytest.raises(ValueError, match=r"^input_ids: no context \(shape \(0, 8\)\)"):
            harvester.harvest(torch.zeros(0, 8, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"^input_ids: contexts of 0 token"):
            harvester.harvest(torch.zeros(2, 0, dtype=torch.int64))
        with pytest.raises(ValueError, match="input_ids must have 2 dimension"):
            harvester.harvest(_ids(1, 8)[0])
        # the harvester still works after refusing
        x, y = harvester.harvest(_ids(2, 8))
        assert x.shape == y.shape == (16, D)


def test_read_documents_takes_suffixes_in_any_case(tmp_path):
    (tmp_path / "a.TXT").write_text("upper case suffix")
    (tmp_path / "b.Md").write_text("mixed case suffix")
    (tmp_path / "c.txt").write_text("lower case suffix")
    (tmp_path / "d.JSONL").write_text(json.dumps({"text": "a json line"}) + "\n")
    (tmp_path / "e.TXT.bak").write_text("not text")
    docs = H.read_documents([str(tmp_path)])
    assert docs == ["upper case suffix", "mixed case suffix", "lower case suffix", "a json line"]


def test_splice_refuses_a_layer_of_another_width(gpt2):
    from mxd_fast.evaluate import SplicedMLP, splice_layer
    for layer in (MxD(D + 1, 8, D, 8, 2), MxD(D, 8, D - 1, 8, 2), SplicedMLP(MxD(D + 1, 8, D, 8, 2))):
        with pytest.raises(ValueError, match="but the model's blocks are 32 wide"):
            splice_layer(gpt2, 1, layer)
    old = splice_layer(gpt2, 1, _layer())      # the right width goes in, and the original comes back
    assert isinstance(splice_layer(gpt2, 1, old), SplicedMLP)


def test_evaluate_restores_the_layers_mode_when_a_batch_fails(gpt2):
    layer = _layer().train()

    def fail(x):
        raise RuntimeError("a failing batch")
    layer.encode = fail
    with pytest.raises(RuntimeError, match="a failing batch"):
        evaluate(gpt2, layer, 1, _ids(2, 8))
    assert layer.training


def test_a_forward_that_skips_the_mlp_is_an_error(gpt2):
    with H.Harvester(gpt2, 1) as harvester:
        harvester._handle.remove()       # as if the model's forward never ran block 1's MLP
        for call in (harvester.harvest, harvester.run_and_capture):
            with pytest.raises(RuntimeError, match="the MLP of layer 1 did not run"):
                call(_ids(2, 8))
