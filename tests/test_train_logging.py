"""--log: the training curves in TensorBoard event files (read back with TensorBoard's EventAccumulator), in an
offline wandb run (read back from its .wandb file) and in RUN/metrics.csv (exact contents, resumed without a
repeated row); a missing package is one line naming it before anything runs; only rank 0 logs."""
from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path

import pytest

from mxd_fast.train import cli
from mxd_fast.train.loggers import WINDOW_KEYS, parse_loggers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, text files and trainer arguments of tests/test_distributed.py: 6 steps, a logging window
    every 2 steps, 32 held-out tokens."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from test_distributed import _tiny_model_and_text
    root = tmp_path_factory.mktemp("tiny")
    args = _tiny_model_and_text(root)
    (root / "held.txt").write_text(" ".join(["held out words"] * 40))
    return [*args, "--log-every", "2", "--eval-text", str(root / "held.txt"), "--eval-tokens", "32", "--seed", "1"]


def _run(args, out, *extra) -> dict:
    from mxd_fast import train as T
    return T.main([*args, "--out", str(out), *extra])


def _history(out: Path) -> list:
    return json.loads((out / "history.json").read_text())


def _csv_text(history: list) -> str:
    """metrics.csv as it must read: the header, then each window's values as Python writes them."""
    rows = [",".join(WINDOW_KEYS)] + [",".join(str(record[key]) for key in WINDOW_KEYS) for record in history]
    return "\n".join(rows) + "\n"


# ---- the options -------------------------------------------------------------------------------------

def test_log_takes_repeated_and_comma_separated_loggers_and_refuses_others_by_name():
    assert parse_loggers(["csv,tensorboard", "wandb", "csv"]) == ["csv", "tensorboard", "wandb"]
    assert parse_loggers(None) == []
    parse = lambda *argv: cli.resolve_options(cli.build_parser().parse_args(list(argv)))  # noqa: E731
    assert parse("--log", "TensorBoard, csv").log == ["tensorboard", "csv"]
    assert parse("--report-to", "wandb", "--log", "csv").log == ["wandb", "csv"]
    assert parse().log == []
    with pytest.raises(SystemExit, match="--log: unknown logger 'mlflow'; choose from tensorboard, wandb, csv"):
        parse("--log", "csv,mlflow")
    with pytest.raises(SystemExit, match="--wandb-project names the run of --log wandb, which is not chosen"):
        parse("--log", "csv", "--wandb-project", "p")
    assert parse("--log", "wandb", "--wandb-name", "n").wandb_name == "n"
    assert WINDOW_KEYS == ("step", "tokens", "loss", "nmse", "l0", "dead_fraction", "lr", "tokens_per_s",
                           "freq_max", "freq_median", "fired_in_window")


@pytest.mark.parametrize("logger,package,extra", [("wandb", "wandb", "wandb"), ("tensorboard", "tensorboard", "train")])
def test_a_missing_logger_package_is_one_line_naming_it_before_anything_runs(tiny, tmp_path, monkeypatch, capsys,
                                                                             logger, package, extra):
    monkeypatch.setitem(sys.modules, package, None)
    out = tmp_path / "new" / "run"
    assert cli.main([*tiny, "--log", f"csv,{logger}", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"--log {logger} needs the package {package}, not installed: pip install {package} "
                            f"(or pip install 'mxd_fast[{extra}]')\n")
    assert captured.out == "" and not (tmp_path / "new").exists()


# ---- csv -------------------------------------------------------------------------------------------

def test_csv_holds_one_row_per_window_and_a_resumed_run_writes_each_window_once(tiny, tmp_path):
    full = tmp_path / "full"
    _run(tiny, full, "--log", "csv")
    history = _history(full)
    assert [record["step"] for record in history] == [2, 4, 6]
    assert (full / "metrics.csv").read_text() == _csv_text(history)
    part = tmp_path / "part"
    assert _run(tiny, part, "--log", "csv", "--stop-after", "3")["stopped"]   # its checkpoint: step 3
    assert (part / "metrics.csv").read_text() == _csv_text(_history_of_checkpoint(part))
    with open(part / "metrics.csv", "a") as fh:   # a window the interrupted run logged past its checkpoint
        fh.write("4,256,9.0,9.0,9.0,9.0,9.0,9.0,9.0,9.0,9.0\n")
    _run(tiny, part, "--log", "csv", "--resume")
    resumed = _history(part)
    assert (part / "metrics.csv").read_text() == _csv_text(resumed)
    assert [(r["step"], r["loss"], r["nmse"]) for r in resumed] == [(r["step"], r["loss"], r["nmse"]) for r in history]


def _history_of_checkpoint(out: Path) -> list:
    import torch
    return torch.load(out / "checkpoint-rank0.pt", weights_only=False)["history"]


# ---- tensorboard -----------------------------------------------------------------------------------

def _scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_events_hold_each_window_and_the_final_metrics(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    metrics = _run(tiny, out, "--log", "tensorboard")
    history = _history(out)
    scalars = _scalars(out / "tensorboard")
    for key in WINDOW_KEYS[1:]:
        assert [step for step, _ in scalars[f"train/{key}"]] == [2, 4, 6], key
        assert [value for _, value in scalars[f"train/{key}"]] == pytest.approx([r[key] for r in history], rel=1e-6)
    for key in ("nmse", "l0", "dead_fraction", "ce_clean", "ce_spliced", "delta_ce", "kl_spliced", "tokens"):
        assert scalars[f"final/{key}"] == [(6, pytest.approx(metrics[key], rel=1e-6))], key
    assert "final/arch" not in scalars and "final/time_limited" not in scalars   # text and flags are not curves


def test_a_resumed_run_replaces_the_tensorboard_points_logged_past_its_checkpoint(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    out = tmp_path / "run"
    _run(tiny, out, "--log", "tensorboard", "--stop-after", "3")
    time.sleep(1.1)   # event files are named by the second they were opened in, and read in that order
    with SummaryWriter(str(out / "tensorboard")) as writer:   # the interrupted run's point past step 3
        writer.add_scalar("train/loss", 999.0, global_step=4)
    time.sleep(1.1)
    _run(tiny, out, "--log", "tensorboard", "--resume")
    losses = _scalars(out / "tensorboard")["train/loss"]
    assert [step for step, _ in losses] == [2, 4, 6]
    assert [value for _, value in losses] == pytest.approx([r["loss"] for r in _history(out)], rel=1e-6)


# ---- wandb -----------------------------------------------------------------------------------------

def _wandb_records(run_file: Path) -> list:
    """The records of an offline run's .wandb file: a 7-byte header, then LevelDB-log chunks (a 7-byte header:
    crc32, length, type; FULL 1, FIRST 2, MIDDLE 3, LAST 4) in blocks of 32 KiB, each chunk a wandb Record."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block, pos, parts, records = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:   # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):   # a chunk still being written
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def _finished_wandb_records(run_file: Path, timeout: float = 60.0) -> list:
    """The records of the offline run once its exit record is on disk: wandb's core process writes the file
    on its own, and may still be writing it when wandb.finish() returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb without a network or an account, its files in tmp_path."""
    pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", tmp_path / "wandb-dir"), ("WANDB_SILENT", "true"),
                        ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_CONFIG_DIR", tmp_path / "config"),
                        ("WANDB_DATA_DIR", tmp_path / "data"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, str(value))


def _logged_steps(run_file: Path) -> dict:
    """{step: {key: value}} of the history records of an offline run (a step logged in two calls may come as
    one record or as two)."""
    logged = {}
    for record in _finished_wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            logged.setdefault(items.pop("_step"), {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return logged


def test_a_resumed_run_continues_the_wandb_run_of_its_checkpoint(tiny, tmp_path, offline_wandb):
    out = tmp_path / "run"
    _run(tiny, out, "--log", "wandb", "--stop-after", "3")
    _run(tiny, out, "--log", "wandb", "--resume")
    runs = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and runs[0].name == runs[1].name   # run-<id>.wandb: one id, synced as one run
    assert sorted(_logged_steps(runs[0])) == [2] and sorted(_logged_steps(runs[1])) == [4, 6]


def test_an_offline_wandb_run_holds_each_window_and_the_final_metrics(tiny, tmp_path, offline_wandb):
    out = tmp_path / "run"
    metrics = _run(tiny, out, "--log", "wandb", "--wandb-project", "tiny-project", "--wandb-name", "tiny-run")
    run_files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = _finished_wandb_records(run_files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("tiny-project", "tiny-run")
    logged = _logged_steps(run_files[0])
    history = _history(out)
    for record in history:
        assert {k: v for k, v in logged[record["step"]].items() if k.startswith("train/")} == \
            {f"train/{key}": record[key] for key in WINDOW_KEYS[1:]}
    final = {k: v for k, v in logged[6].items() if k.startswith("final/")}
    for key in ("nmse", "ce_clean", "delta_ce", "tokens"):
        assert final[f"final/{key}"] == metrics[key] and math.isfinite(final[f"final/{key}"])
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    assert summary["final/delta_ce"] == metrics["delta_ce"]


# ---- several ranks ---------------------------------------------------------------------------------

def test_only_rank_0_logs(tiny, tmp_path):
    import torch.distributed as dist
    pytest.importorskip("tensorboard")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import _torchrun
    out = tmp_path / "run"
    _torchrun([*tiny, "--report-to", "tensorboard,csv", "--out", str(out)])   # torchrun takes --log for its own
    assert len(list((out / "tensorboard").iterdir())) == 1   # one event file: one writer
    assert (out / "metrics.csv").read_text() == _csv_text(_history(out))
    assert [step for step, _ in _scalars(out / "tensorboard")["train/loss"]] == [2, 4, 6]
