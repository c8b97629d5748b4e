"""Hugging Face Hub format: save_pretrained / from_pretrained / load_pretrained / push_to_hub, offline."""
import json
import subprocess
import sys

import pytest
import torch

import mxd_fast

pytest.importorskip("safetensors")
huggingface_hub = pytest.importorskip("huggingface_hub")
from safetensors.torch import load_file, save_file  # noqa: E402


def _trained(layer):
    """The layer with every parameter random (a trained layer's zero-initialised parts are not zero)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32))
    return layer


VARIANTS = {
    "mxd": lambda: mxd_fast.MxD(12, 10, 9, 40, 5),
    "mxd-glu-silu": lambda: mxd_fast.MxD(12, 10, 9, 40, 5, activation="silu", glu=True),
    "mxd-skip-relu": lambda: mxd_fast.MxD(12, 10, 9, 40, 3, activation="relu", skip=True),
    "mxd-glu-skip-bf16": lambda: mxd_fast.MxD(12, 10, 9, 40, 5, activation="gelu_tanh", glu=True, skip=True,
                                              dtype=torch.bfloat16),
    "transcoder": lambda: mxd_fast.TopKTranscoder(12, 50, 9, 4),
    "skip-transcoder-bf16": lambda: mxd_fast.TopKTranscoder(12, 50, 9, 4, skip=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_keeps_values_dtypes_and_outputs(variant, tmp_path):
    layer = _trained(VARIANTS[variant]())
    folder = layer.save_pretrained(tmp_path / "saved", metrics={"ce_increase": 0.0023, "steps": 1000, "data": "owt"})
    assert folder == tmp_path / "saved"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(4, 12, dtype=next(layer.parameters()).dtype)
    for loaded in (type(layer).from_pretrained(folder), mxd_fast.load_pretrained(str(folder))):
        assert type(loaded) is type(layer) and loaded.constructor_arguments() == layer.constructor_arguments()
        assert loaded.state_dict().keys() == layer.state_dict().keys()
        for name, value in layer.state_dict().items():
            got = loaded.state_dict()[name]
            assert got.dtype == value.dtype and torch.equal(got, value), name
        assert torch.equal(loaded(x), layer(x))
    config = json.loads((folder / "config.json").read_text())
    assert config == {"format": "mxd_fast", "format_version": 1, "class": type(layer).__name__,
                      "mxd_fast_version": mxd_fast.__version__, **layer.constructor_arguments(),
                      "dtype": str(next(layer.parameters()).dtype).removeprefix("torch.")}
    tensors = load_file(str(folder / "model.safetensors"))     # the Hub layout: the state dict itself
    assert tensors.keys() == layer.state_dict().keys()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mxd_fast\n") and f"# mxd_fast.{type(layer).__name__}" in card
    for arg, value in layer.constructor_arguments().items():
        assert f"| {arg} | {value} |" in card
    assert f"| parameters | {sum(p.numel() for p in layer.parameters()):,} |" in card
    assert "| ce_increase | 0.0023 |" in card and "| steps | 1000 |" in card and "| data | owt |" in card
    assert "mxd_fast.load_pretrained(" in card


def test_card_describes_the_architecture_and_leaves_out_absent_metrics(tmp_path):
    mxd_fast.MxD(12, 10, 9, 40, 5, glu=True).save_pretrained(tmp_path / "mxd")
    card = (tmp_path / "mxd" / "README.md").read_text()
    assert "Mixture of Decoders" in card and "40 full-rank experts, 5 active per token" in card
    assert "* (x W_glu + b_glu)" in card and "Training metrics" not in card
    mxd_fast.TopKTranscoder(12, 50, 9, 4, skip=True).save_pretrained(tmp_path / "tc", metrics={"a|b": 1.5})
    card = (tmp_path / "tc" / "README.md").read_text()
    assert "TopK skip-transcoder" in card and "50 latents, 4 active per token" in card and "| a\\|b | 1.5 |" in card


def test_load_with_another_dtype_and_device(tmp_path):
    layer = _trained(mxd_fast.MxD(12, 10, 9, 40, 5, glu=True))
    layer.save_pretrained(tmp_path)
    loaded = mxd_fast.MxD.from_pretrained(tmp_path, device=torch.device("cpu"), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    torch.testing.assert_close(loaded.experts, layer.experts.double(), rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.parameters())


def test_a_repo_id_is_downloaded_with_snapshot_download(tmp_path, monkeypatch):
    layer = _trained(mxd_fast.TopKTranscoder(12, 50, 9, 4))
    layer.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)                   # no local folder of the repo id's name
    loaded = mxd_fast.load_pretrained("someone/mxd-gpt2-l8", revision="v1", token="t")
    assert torch.equal(loaded.decoder, layer.decoder)
    loaded = mxd_fast.TopKTranscoder.from_pretrained("someone/mxd-gpt2-l8")
    assert torch.equal(loaded.decoder, layer.decoder)
    repo_id, kwargs = calls[0]
    assert repo_id == "someone/mxd-gpt2-l8" and kwargs["revision"] == "v1" and kwargs["token"] == "t"
    assert sorted(kwargs["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="holds a TopKTranscoder, not a MxD"):
        mxd_fast.MxD.from_pretrained("someone/mxd-gpt2-l8")


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    layer = _trained(mxd_fast.MxD(12, 10, 9, 40, 5, skip=True))
    calls = []

    def fake_upload_folder(*, repo_id, folder_path, **kwargs):
        loaded = mxd_fast.load_pretrained(folder_path)          # the folder as it is at upload time
        card = open(f"{folder_path}/README.md").read()
        calls.append(("upload", repo_id, kwargs, loaded, card))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    assert layer.push_to_hub("me/my-mxd", metrics={"fvu": 0.1}, private=True, token="tok") == "commit-info"
    assert calls[0] == ("create", "me/my-mxd", {"token": "tok", "private": True, "exist_ok": True})
    _, repo_id, kwargs, loaded, card = calls[1]
    assert repo_id == "me/my-mxd" and kwargs["token"] == "tok" and kwargs["commit_message"] == "Upload mxd_fast.MxD"
    assert torch.equal(loaded.skip.weight, layer.skip.weight)
    assert "mxd_fast.load_pretrained('me/my-mxd')" in card and "| fvu | 0.1 |" in card
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id"):
        layer.push_to_hub("not a repo id")


# ---- bad input ---------------------------------------------------------------------------------

def _saved(tmp_path, layer=None):
    (layer or mxd_fast.MxD(12, 10, 9, 40, 5)).save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_or_files_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere/at/all.* not a Hugging Face Hub repo id"):
        mxd_fast.load_pretrained(str(tmp_path / "nowhere" / "at" / "all"))
    folder = _saved(tmp_path)
    with pytest.raises(NotADirectoryError, match="model.safetensors: expected a folder"):
        mxd_fast.load_pretrained(folder / "model.safetensors")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        mxd_fast.MxD.from_pretrained(folder)
    with pytest.raises(TypeError, match="path must be a folder or a Hub repo id"):
        mxd_fast.load_pretrained(3)


def test_a_config_of_another_class_or_format_is_refused(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(ValueError, match="holds a MxD, not a TopKTranscoder: load it with mxd_fast.load_pretrained"):
        mxd_fast.TopKTranscoder.from_pretrained(folder)
    _edit_config(folder, **{"class": "Linear"})
    with pytest.raises(ValueError, match="class 'Linear' is not one of \\['MxD', 'TopKTranscoder'\\]"):
        mxd_fast.load_pretrained(folder)
    _edit_config(folder, **{"class": "MxD", "format_version": 2})
    with pytest.raises(ValueError, match="format_version 2 is not one this mxd_fast"):
        mxd_fast.load_pretrained(folder)
    _edit_config(folder, format=None)
    with pytest.raises(ValueError, match="is not an mxd_fast config"):
        mxd_fast.load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        mxd_fast.load_pretrained(folder)


@pytest.mark.parametrize("changes,match", [
    (dict(n_experts=None), "MxD needs n_experts"),
    (dict(width=50), "MxD takes no width"),
    (dict(k=41), "config.json: k must satisfy 1 <= k <= n_experts = 40"),
    (dict(activation="tanh"), "config.json: activation must be one of"),
])
def test_bad_constructor_arguments_in_the_config_are_refused_by_name(tmp_path, changes, match):
    folder = _saved(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=match):
        mxd_fast.load_pretrained(folder)


def test_tensors_that_do_not_fit_the_config_are_refused_by_name(tmp_path):
    folder = _saved(tmp_path, mxd_fast.MxD(12, 10, 9, 40, 5, glu=True))
    tensors = load_file(str(folder / "model.safetensors"))
    _edit_config(folder, d_in=13)
    with pytest.raises(ValueError, match=r"encoder.weight has shape \(10, 12\), the config.s layer needs \(10, 13\)"):
        mxd_fast.load_pretrained(folder)
    _edit_config(folder, d_in=12, glu=False)
    with pytest.raises(ValueError, match="unexpected glu.bias, glu.weight"):
        mxd_fast.load_pretrained(folder)
    _edit_config(folder, glu=True)
    save_file({k: v for k, v in tensors.items() if k != "experts"}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing experts"):
        mxd_fast.load_pretrained(folder)
    save_file({**tensors, "experts": tensors["experts"].long()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="experts has dtype torch.int64, not a floating-point dtype"):
        mxd_fast.load_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        mxd_fast.load_pretrained(folder)


def test_bad_arguments_are_refused_by_name(tmp_path):
    layer = mxd_fast.MxD(12, 10, 9, 40, 5)
    folder = _saved(tmp_path, layer)
    with pytest.raises(ValueError, match="device: 'nodevice' is not a torch device"):
        mxd_fast.load_pretrained(folder, device="nodevice")
    with pytest.raises(ValueError, match="device: a meta tensor holds no data"):
        mxd_fast.load_pretrained(folder, device="meta")
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        mxd_fast.load_pretrained(folder, dtype=torch.int32)
    with pytest.raises(TypeError, match="metrics must be a mapping"):
        layer.save_pretrained(tmp_path / "m", metrics=[("a", 1)])
    with pytest.raises(TypeError, match=r"metrics\['a'\] must be a number or a string, got list"):
        layer.save_pretrained(tmp_path / "m", metrics={"a": [1]})
    with pytest.raises(TypeError, match="metrics: names must be strings"):
        layer.save_pretrained(tmp_path / "m", metrics={1: 1})
    with pytest.raises(TypeError, match="save_directory must be a str or os.PathLike"):
        layer.save_pretrained(None)
    with pytest.raises(ValueError, match="MxD is on the meta device"):
        mxd_fast.MxD(12, 10, 9, 40, 5, device="meta").save_pretrained(tmp_path / "meta")
    assert not (tmp_path / "m").exists() and not (tmp_path / "meta").exists()


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    layer = mxd_fast.MxD(12, 10, 9, 40, 5)
    folder = _saved(tmp_path, layer)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match=r"needs huggingface_hub: pip install 'mxd_fast\[hub\]'"):
        mxd_fast.load_pretrained("someone/repo")
    with pytest.raises(ImportError, match="needs huggingface_hub"):
        layer.push_to_hub("someone/repo")
    assert isinstance(mxd_fast.load_pretrained(folder), mxd_fast.MxD)   # a local folder needs safetensors only
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"needs safetensors: pip install 'mxd_fast\[hub\]'"):
        layer.save_pretrained(tmp_path / "again")
    with pytest.raises(ImportError, match="needs safetensors"):
        mxd_fast.load_pretrained(folder)


def test_importing_mxd_fast_imports_no_hub_package():
    code = ("import sys, mxd_fast; print(sorted(m for m in ('huggingface_hub', 'safetensors', 'transformers', "
            "'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
