"""A training run folder is a Hugging Face Hub folder: mxd_fast.load_pretrained(run) and MxD.from_pretrained(run)
load the layer load_layer(run) loads, also from a Hub repo the folder was uploaded to as it is; its README.md
model card holds the training metrics; a run folder of the earlier layout still loads with load_layer, and a
run finished in it resumes into the Hub layout."""
from __future__ import annotations

import fnmatch
import json
import shutil

import pytest
import torch

import mxd_fast

pytest.importorskip("safetensors")
huggingface_hub = pytest.importorskip("huggingface_hub")

from mxd_fast.train import checkpoint, layer_io  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, text files and trainer arguments of tests/test_distributed.py (6 steps), with held-out
    text for the CE evaluation."""
    pytest.importorskip("transformers")
    from test_distributed import _tiny_model_and_text
    root = tmp_path_factory.mktemp("tiny")
    args = _tiny_model_and_text(root)
    (root / "held.txt").write_text(" ".join(["held out words"] * 40))
    return root, [*args, "--eval-text", str(root / "held.txt"), "--eval-tokens", "32"]


def _run(args, out, *extra) -> dict:
    from mxd_fast import train as T
    return T.main([*args, "--out", str(out), *extra])


def _assert_same_layer(a, b) -> None:
    assert type(a) is type(b) and a.constructor_arguments() == b.constructor_arguments()
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, value in a.state_dict().items():
        assert value.dtype == b.state_dict()[name].dtype and torch.equal(value, b.state_dict()[name]), name


def _cell(value) -> str:
    """A metric as the card's table writes it: floats in their shortest exact form."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def test_a_run_folder_loads_with_load_pretrained_and_its_card_holds_the_metrics(tiny, tmp_path):
    root, args = tiny
    out = tmp_path / "run"
    metrics = _run(args, out)
    trained = mxd_fast.train.load_layer(out)
    for loaded in (mxd_fast.load_pretrained(out), mxd_fast.load_pretrained(str(out)),
                   mxd_fast.MxD.from_pretrained(out)):
        _assert_same_layer(loaded, trained)
    with pytest.raises(ValueError, match="holds a MxD, not a TopKTranscoder"):
        mxd_fast.TopKTranscoder.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["class"], config["weights"]) == ("mxd_fast", "MxD", "layer.safetensors")
    assert config["extra_keys"] == ["corpus", "layer", "model", "train"]
    assert config["model"] == {"name": str(root / "model"), "layer": 0, "d": 32, "mlp_hidden": 64,
                               "mlp_activation": "silu", "mlp_gated": True}
    assert config["layer"] == layer_io.layer_spec(trained) and config["train"]["k"] == 4
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mxd_fast\n") and "## Training metrics" in card
    assert f"Trained to replace the MLP of layer 0 of `{root / 'model'}` with mxd_fast.train." in card
    shown = [key for key, value in metrics.items() if value is not None]
    for key in ("nmse", "l0", "dead_fraction", "tokens", "ce_clean", "ce_spliced", "delta_ce", "kl_spliced",
                "eval_nmse", "wall_seconds", "arch"):
        assert key in shown, key
    for key in shown:
        assert f"| {key} | {_cell(metrics[key])} |" in card, key
    assert "| parallel |" not in card   # None: does not apply to one process
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_a_transcoder_run_loads_as_a_transcoder(tiny, tmp_path):
    _, args = tiny
    out = tmp_path / "run"
    metrics = _run(args, out, "--arch", "skip-transcoder", "--eval-tokens", "0")
    loaded = mxd_fast.load_pretrained(out)
    assert isinstance(loaded, mxd_fast.TopKTranscoder) and loaded.skip is not None
    _assert_same_layer(loaded, mxd_fast.train.load_layer(out))
    card = (out / "README.md").read_text()
    assert "TopK skip-transcoder" in card and f"| nmse | {_cell(metrics['nmse'])} |" in card
    assert "ce_clean" not in card


def test_a_run_folder_uploaded_as_it_is_loads_from_the_hub(tiny, tmp_path, monkeypatch):
    _, args = tiny
    out = tmp_path / "run"
    _run(args, out, "--eval-tokens", "0")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        """The files of the repo (the run folder, uploaded whole) that allow_patterns select, as the Hub gives them."""
        calls.append(list(allow_patterns))
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(exist_ok=True)
        for file in out.iterdir():
            if file.is_file() and any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)   # no local folder named like the repo id
    _assert_same_layer(mxd_fast.load_pretrained("someone/mxd-run"), mxd_fast.train.load_layer(out))
    assert calls == [["config.json", "model.safetensors", "README.md"], ["layer.safetensors"]]   # the weights it names


def test_a_run_folder_of_the_earlier_layout_loads_and_resumes_into_the_hub_layout(tiny, tmp_path):
    """Before the Hub layout, config.json held {"layer": layer_spec, "model", "train", "corpus"} and there was no
    README.md: such a folder loads with load_layer, load_pretrained says to use it, and a finished run in it
    trains further with --resume and ends in the Hub layout."""
    _, args = tiny
    out = tmp_path / "run"
    _run(args, out, "--eval-tokens", "0")
    trained = mxd_fast.train.load_layer(out)
    config = json.loads((out / "config.json").read_text())
    earlier = {"layer": config["layer"], "model": config["model"], "train": config["train"], "corpus": config["corpus"]}
    (out / "config.json").write_text(json.dumps(earlier, indent=2) + "\n")
    (out / "README.md").unlink()
    _assert_same_layer(mxd_fast.train.load_layer(out), trained)
    _assert_same_layer(mxd_fast.train.load_layer(out / "layer.safetensors"), trained)
    with pytest.raises(ValueError, match="not an mxd_fast config .*earlier mxd_fast.train: load it with "
                                         "mxd_fast.train.load_layer"):
        mxd_fast.load_pretrained(out)
    assert _run(args, out, "--eval-tokens", "0", "--resume", "--tokens", "768")["tokens"] == 768
    _assert_same_layer(mxd_fast.load_pretrained(out), mxd_fast.train.load_layer(out))
    assert "| tokens | 768 |" in (out / "README.md").read_text()


# ---- save_layer and the run's files -----------------------------------------------------------------

def test_save_layer_writes_a_hub_folder_and_refuses_extra_keys_of_the_layers_own(tmp_path):
    layer = mxd_fast.TopKTranscoder(6, 8, 6, 2)
    with torch.no_grad():
        layer.decoder.normal_()
    layer_io.save_layer(layer, tmp_path / "run", {"model": {"name": "m", "layer": 3}, "note": 1}, {"fvu": 0.25})
    _assert_same_layer(mxd_fast.load_pretrained(tmp_path / "run"), layer)
    assert "| fvu | 0.25 |" in (tmp_path / "run" / "README.md").read_text()
    with pytest.raises(ValueError, match="extra: 'k' is the layer's own config key"):
        layer_io.save_layer(layer, tmp_path / "clash", {"k": 3})
    assert not (tmp_path / "clash").exists()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "stray": 1}))   # not under extra_keys
    with pytest.raises(ValueError, match="TopKTranscoder takes no stray"):
        mxd_fast.load_pretrained(tmp_path / "run")


def test_the_card_metrics_csv_and_event_files_are_a_runs_only_beside_its_files(tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    (tmp_path / "metrics.csv").write_text("a,b\n")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1.host.2.0").write_bytes(b"")
    assert checkpoint.run_files(tmp_path) == []   # no run here: nothing for --overwrite to remove
    (tmp_path / "checkpoint-rank0.pt").write_bytes(b"")
    assert [str(p.relative_to(tmp_path)) for p in checkpoint.run_files(tmp_path)] == [
        "README.md", "checkpoint-rank0.pt", "metrics.csv", "tensorboard/events.out.tfevents.1.host.2.0"]


def test_overwrite_removes_the_old_runs_card_and_curves(tiny, tmp_path):
    _, args = tiny
    out = tmp_path / "run"
    _run(args, out, "--eval-tokens", "0", "--log", "csv")
    assert (out / "README.md").is_file() and (out / "metrics.csv").is_file()
    _run(args, out, "--eval-tokens", "0", "--stop-after", "2", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-rank0.pt"]
