"""python -m bench: run the benchmark suite, print a table, write JSON and a plot.

Examples
  python -m bench                                  # default suite on the best device present
  python -m bench --quick                          # small shapes, few repetitions (a check that it works)
  python -m bench --ops train --shapes gpt2:T=2048 --providers reference,torch
  python -m bench --ops gather_combine --shapes sweep-k --modes fwd+bwd
  python -m bench --shapes paper --dtype bf16 --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import sys
import tempfile

import torch

import mxd_fast

from . import cases as C
from . import report, shapes as S, timing as T

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
MODES = (*C.OP_MODES, C.TRAIN_MODE)
PROVIDERS = tuple(dict.fromkeys(p for op in C.OPS for p in C.all_providers(op)))

MEMORY_FRACTION = 0.9      # skip a case whose estimated memory exceeds this share of the free memory
MAX_COPIES = 8             # inputs rotate over at most this many copies


@dataclasses.dataclass(frozen=True)
class Job:
    op: str
    mode: str
    shape: S.Shape


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def default_jobs(device_type: str, quick: bool) -> list[Job]:
    """The default suite. CPU: scaled down to finish in a few minutes on two cores, with the GPT-2
    training step at 2048 tokens. GPU: the paper's four shapes at 4096 tokens, K = 32, and sweeps
    over K, N and tokens around Pythia-1.4B."""
    jobs: list[Job] = []

    def ops_on(shapes, modes=C.OP_MODES):
        for s in shapes:
            for op in C.OPS[:3]:
                for mode in modes:
                    jobs.append(Job(op, mode, s))

    if quick:
        ops_on([S.parse_shape("small:T=256")])
        ops_on([dataclasses.replace(s, sweep="K") for s in S.sweep("K", S.parse_shape("small:T=128"))[:3]],
               ("fwd+bwd",))
        jobs.append(Job("train", C.TRAIN_MODE, S.parse_shape("small:T=256")))
    elif device_type == "cuda":
        base = S.PAPER["pythia-1.4b"]
        ops_on(S.PAPER.values())
        ops_on(S.sweep("K", base) + S.sweep("N", base) + S.sweep("T", base))
        jobs += [Job("train", mode, s) for s in S.PAPER.values() for mode in C.modes_for("train")]
    else:
        ops_on([S.parse_shape("gpt2:T=512")])
        ops_on(S.cpu_scaled("K") + S.cpu_scaled("N"), ("fwd+bwd",))
        jobs += [Job("train", mode, S.parse_shape("gpt2:T=2048")) for mode in C.modes_for("train")]
    return jobs


def name_list(option: str, text: str | None, known: tuple[str, ...], noun: str) -> list[str] | None:
    """The comma-separated names of a list option, repeats dropped (order kept); None when not given."""
    if text is None:
        return None
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise SystemExit(f"{option}: no {noun} given; known: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"{option}: unknown {noun} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return names


def select_jobs(args, device_type: str) -> list[Job]:
    """The (op, mode, shape) jobs the options select. Exits naming --modes when a mode selects nothing."""
    ops = name_list("--ops", args.ops, C.OPS, "op")
    modes = name_list("--modes", args.modes, MODES, "mode")
    if args.shapes is not None:
        try:
            shapes = S.resolve(S.split_specs(args.shapes), device_type)
        except ValueError as e:
            raise SystemExit(f"--shapes: {e}") from None
        if not shapes:
            raise SystemExit(f"--shapes: no shape given in {args.shapes!r}")
        jobs = [Job(op, mode, s) for s in shapes for op in (ops or C.OPS) for mode in C.modes_for(op)]
    else:
        jobs = [j for j in default_jobs(device_type, args.quick) if ops is None or j.op in ops]
    if modes:
        present = list(dict.fromkeys(j.mode for j in jobs))
        idle = [m for m in modes if m not in present]
        if idle:
            cases = f"--ops {','.join(ops or C.OPS)}" + ("" if args.shapes is not None else " in the default suite")
            owners = "; ".join(f"{m} is a mode of {', '.join(op for op in C.OPS if m in C.modes_for(op))}"
                               for m in idle)
            elsewhere = any(m in C.modes_for(op) for m in idle for op in ops or C.OPS)
            hint = " (with --shapes an op runs every mode it has)" if elsewhere and args.shapes is None else ""
            raise SystemExit(f"--modes {','.join(idle)} selects nothing: the cases of {cases} have modes "
                             f"{', '.join(present)}; {owners}{hint}")
        jobs = [j for j in jobs if j.mode in modes]
    return jobs


def plan_runs(jobs: list[Job], device: torch.device,
              requested: list[str] | None) -> tuple[list[tuple[Job, list[str]]], dict]:
    """([(job, providers to run)] for the jobs with any, {provider: why it cannot run}). Exits naming
    --providers when a requested provider applies to none of the jobs' ops, or none can run on the device."""
    ops = list(dict.fromkeys(j.op for j in jobs))
    offered = list(dict.fromkeys(p for op in ops for p in C.all_providers(op)))
    idle = [p for p in requested or () if p not in offered]
    if idle:
        raise SystemExit(f"--providers {','.join(idle)} selects nothing: the selected ops ({', '.join(ops)}) "
                         f"have providers {', '.join(offered)}")
    plan, unavailable = [], {}
    for job in jobs:
        run, missing = providers_for(job.op, device, requested)
        for p, why in missing.items():
            unavailable.setdefault(p, why)
        if run:
            plan.append((job, run))
    if not plan:
        why = "; ".join(f"{p}: {reason}" for p, reason in unavailable.items())
        runnable = [p for p in offered if C.provider_unavailable(p, device) is None]
        raise SystemExit(f"--providers {','.join(requested or offered)}: none can run on {device} ({why}); "
                         f"available there: {', '.join(runnable)}")
    return plan, unavailable


def providers_for(op: str, device: torch.device, requested: list[str] | None) -> tuple[list[str], dict]:
    """(providers to run, {provider: why it cannot run}). Without a request: every provider that runs
    on the device, except Triton on CPU (the interpreter is far too slow to time)."""
    run, missing = [], {}
    for p in C.all_providers(op):
        if requested is not None and p not in requested:
            continue
        reason = C.provider_unavailable(p, device)
        if reason is None and requested is None and p == "triton" and device.type == "cpu":
            reason = "the Triton interpreter on CPU is not timed unless asked for (--providers triton)"
        if reason is not None:
            missing[p] = reason
        else:
            run.append(p)
    return run, missing


def choose_copies(case: C.Case, cache: int, free: int) -> int:
    copies = max(1, min(MAX_COPIES, math.ceil(2 * cache / max(case.input_bytes, 1))))
    while copies > 1 and case.estimated_memory(copies) > 0.5 * free:
        copies -= 1
    return copies


def _row(case: C.Case) -> dict:
    return {"op": case.op, "provider": case.provider, "shape": case.shape.name, "dims": case.shape.dims(),
            "sweep": case.shape.sweep, "mode": case.mode, "dtype": DTYPE_NAMES[case.dtype],
            "median": None, "p20": None, "p80": None, "reps": 0, "copies": 0, "interleaved": False,
            "flops": case.flops, "tflops": None, "frac_matmul": None,
            "bytes": case.bytes, "gbps": None, "frac_copy": None,
            "memory": None, "memory_method": None, "estimated_memory": case.estimated_memory(1),
            "speedup_vs_reference": None, "status": "ok", "note": case.note}


def _error(row: dict, e: BaseException) -> None:
    row["status"] = "error"
    first = str(e).splitlines()[0] if str(e) else ""
    row["note"] = f"error: {type(e).__name__}: {first}"[:160]


def _fill(row: dict, case: C.Case, t: T.Timing, ceilings: T.Ceilings) -> None:
    row.update(median=t.median, p20=t.p20, p80=t.p80, reps=t.reps)
    row["tflops"] = case.flops / t.median / 1e12
    row["frac_matmul"] = case.flops / t.median / ceilings.matmul_flops
    if case.bytes is not None:
        row["gbps"] = case.bytes / t.median / 1e9
        row["frac_copy"] = case.bytes / t.median / ceilings.copy_bytes


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_group(cases: list[C.Case], cfg: T.TimingConfig, ceilings: T.Ceilings, cache: int) -> list[dict]:
    """Time the providers of one (op, mode, shape) on shared random inputs. A provider whose estimated
    memory exceeds MEMORY_FRACTION of the free memory is skipped (a note says so); one that fails gets
    an error row. CPU: the providers take turns call by call when their states fit in memory together;
    GPU: one after the other, each with its own CUDA-event timing."""
    rows = [_row(c) for c in cases]
    if not cases:
        return rows
    device = cases[0].device
    free = T.free_memory(device)
    live = []
    for case, row in zip(cases, rows):
        if case.estimated_memory(1) > MEMORY_FRACTION * free:
            row["status"] = "skipped"
            row["note"] = (f"skipped: estimated {case.estimated_memory(1) / 2**30:.1f} GiB > "
                           f"{MEMORY_FRACTION:.0%} of free {free / 2**30:.1f} GiB")
        else:
            live.append((case, row))
    if not live:
        return rows
    widest = max(live, key=lambda cr: cr[0].workspace_bytes)[0]
    copies = choose_copies(widest, cache, free)
    try:
        inputs = live[0][0].make_inputs(copies)
    except Exception as e:  # noqa: BLE001
        for _, row in live:
            _error(row, e)
        return rows
    for _, row in live:
        row["copies"] = copies
    together = sum(c.workspace_bytes for c, _ in live) + copies * widest.input_bytes
    interleave = device.type == "cpu" and len(live) > 1 and together < 0.5 * free
    if interleave:
        fns = []
        for case, row in live:
            try:
                fns.append(case.make_fn())
            except Exception as e:  # noqa: BLE001
                _error(row, e)
                fns.append(None)
        ok = [k for k, f in enumerate(fns) if f is not None]
        timings = T.time_interleaved([fns[k] for k in ok], inputs, cfg)
        for k, t in zip(ok, timings):
            case, row = live[k]
            if isinstance(t, BaseException):
                _error(row, t)
                continue
            _fill(row, case, t, ceilings)
            row["interleaved"] = True
            try:
                row["memory"], row["memory_method"] = T.peak_memory(fns[k], inputs[0], device)
            except Exception as e:  # noqa: BLE001
                _error(row, e)
        del fns
        _release(device)
    else:
        for case, row in live:
            fn = None
            try:
                fn = case.make_fn()
                t = T.time_calls(fn, inputs, device, cfg)
                _fill(row, case, t, ceilings)
                row["memory"], row["memory_method"] = T.peak_memory(fn, inputs[0], device)
            except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
                _error(row, e)
            finally:
                del fn
                _release(device)
    del inputs
    _release(device)
    ref = next((r for r in rows if r["provider"] == "reference" and r["median"]), None)
    for r in rows:   # a partial provider times a part of the op: no speedup over the whole op
        if ref is not None and r["median"] and r["provider"] not in C.PARTIAL_PROVIDERS:
            r["speedup_vs_reference"] = ref["median"] / r["median"]
    return rows


def run_case(case: C.Case, cfg: T.TimingConfig, ceilings: T.Ceilings, cache: int) -> dict:
    """One provider alone."""
    return run_group([case], cfg, ceilings, cache)[0]


def pick_device(name: str | None) -> torch.device:
    """The device of --device: cpu or cuda[:i], where present (default: cuda when present)."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if name is None:
        return torch.device("cuda") if cuda else torch.device("cpu")
    here = f"available here: {', '.join(['cpu', *cuda])}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise SystemExit(f"--device {name!r}: the benchmarks run on cpu or cuda[:i]; {here}")
    if device.type == "cuda" and not cuda:
        raise SystemExit(f"--device {name}: no CUDA device is available; {here}")
    if device.type == "cuda" and device.index is not None and device.index >= len(cuda):
        raise SystemExit(f"--device {name}: no such CUDA device; {here}")
    return device


RESULT_FILES = ("results.json", "table.txt", "speedup.png")


def default_out_dir(base: str) -> str:
    """base, or base-2, base-3, ...: the first that holds no results (runs on the same day keep theirs)."""
    path, n = base, 1
    while any(os.path.lexists(os.path.join(path, f)) for f in RESULT_FILES):
        n += 1
        path = f"{base}-{n}"
    return path


def make_out_dir(path: str, option_given: bool, overwrite: bool = False) -> None:
    """Create the output folder before anything is measured, and write a file in it; exits naming --out
    when it cannot be used, or when it holds an earlier run's results and overwrite is off (with it on,
    they are removed, so that no file of the earlier run is left beside the new ones)."""
    where = f"--out {path}" if option_given else f"the output folder {path} (choose another with --out)"
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"{where}: exists and is not a folder")
    old = [f for f in RESULT_FILES if os.path.lexists(os.path.join(path, f))]
    for name in old:
        if os.path.isdir(os.path.join(path, name)):
            raise SystemExit(f"{where}: {name} in it is a folder; the results are written to that name")
    if old and not overwrite:
        raise SystemExit(f"{where}: holds the results of an earlier run ({', '.join(old)}); choose another "
                         f"folder or pass --overwrite to replace them")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SystemExit(f"{where}: cannot write there: {e.strerror or e}") from None
    for name in old:
        try:
            os.remove(os.path.join(path, name))
        except OSError as e:
            raise SystemExit(f"{where}: cannot remove the earlier {name}: {e.strerror or e}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", help=f"comma-separated subset of {','.join(C.OPS)} (default: the suite's)")
    p.add_argument("--modes", help="comma-separated subset of fwd, fwd+bwd, step")
    p.add_argument("--providers", help="comma-separated subset of reference, gemm+topk, gemm, torch, triton, cuda, "
                                       "embedding_bag, sparsify, transcoder, mlp (default: every one that runs on "
                                       "the device)")
    p.add_argument("--shapes", help="comma-separated shape specs: gpt2, pythia-410m, pythia-1.4b, llama-3.2-3b, "
                                    "small, tiny, paper, with overrides name:T=2048,K=64,N=..,H=..,d=.., or "
                                    "sweep-k / sweep-n / sweep-t (optionally @base-shape)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when present)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="floating dtype (default fp32)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    p.add_argument("--reps", type=positive_int,
                   help="time exactly this many calls per case, after one warm-up call")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="mxd_fast.reuse_freed_memory() before timing: freed CPU memory is kept for reuse, so large "
                        "tensors do not fault fresh pages in every call (default: off, the allocator as it is)")
    p.add_argument("--out", help="output folder (default bench/results/<date>-<device>[-quick]/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (otherwise such a folder is refused)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    gc.collect()
    gc.freeze()  # what exists now lives for the whole run: keeps the per-case collections cheap
    try:
        return _main(args)
    finally:
        gc.unfreeze()


def _main(args) -> int:
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    cores = len(os.sched_getaffinity(0))
    if args.threads is not None and args.threads > cores:
        raise SystemExit(f"--threads {args.threads}: this process may use {cores} cores; use 1 to {cores}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cores)
    reused = mxd_fast.reuse_freed_memory() if args.reuse_freed_memory else False
    jobs = select_jobs(args, device.type)
    requested = name_list("--providers", args.providers, PROVIDERS, "provider")
    plan, unavailable = plan_runs(jobs, device, requested)
    now = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or default_out_dir(os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"{now:%Y-%m-%d}-{T.device_slug(device)}{'-quick' if args.quick else ''}"))
    make_out_dir(out_dir, args.out is not None, args.overwrite)
    cfg = T.TimingConfig.for_device(device, args.quick)
    if args.reps:
        cfg = T.TimingConfig(warmup_calls=1, warmup_time=0.0, min_reps=args.reps, max_reps=args.reps, target_time=0.0)
    ceilings = T.measure_ceilings(device, dtype, args.quick, cfg)
    meta = {"device": str(device), "device_name": T.device_name(device), "dtype": DTYPE_NAMES[dtype],
            "threads": torch.get_num_threads(), "reuse_freed_memory": reused, "versions": T.versions(),
            "git_commit": T.git_commit(),
            "date": now.isoformat(timespec="seconds"), "quick": args.quick, "argv": args.argv,
            "ceilings": ceilings.as_dict(), "timing": dataclasses.asdict(cfg),
            "memory_method": ("torch.cuda.max_memory_allocated growth over the call" if device.type == "cuda" else
                              "growth of the resident set (VmHWM - VmRSS before the call)"),
            "load_average": os.getloadavg(), "unavailable": unavailable}
    cache = T.cache_bytes(device)
    print(f"mxd_fast bench: {len(plan)} op/shape/mode cases on {meta['device_name']} ({device}), "
          f"{meta['dtype']}, ceilings: matmul {ceilings.matmul_flops / 1e12:.3g} TFLOP/s, "
          f"copy {ceilings.copy_bytes / 1e9:.3g} GB/s", flush=True)
    rows: list[dict] = []
    for job, providers in plan:
        cases = [C.make_case(job.op, job.mode, p, job.shape, dtype, device) for p in providers]
        group = run_group(cases, cfg, ceilings, cache)
        for row in group:
            row.update(device=str(device), device_name=meta["device_name"], versions=meta["versions"],
                       git_commit=meta["git_commit"], date=meta["date"], threads=meta["threads"])
            took = "-" if row["median"] is None else f"{row['median'] * 1e3:.3f} ms"
            status = row["note"] if row["status"] != "ok" else ""
            print(f"  {job.op:14s} {job.mode:7s} {job.shape.name:28s} {row['provider']:10s} {took:>12s} {status}",
                  flush=True)
        rows += group
        # what is measured so far, in case the run is cut off (the final write replaces it)
        report.write_json(os.path.join(out_dir, "results.json"), {**meta, "partial": True}, rows)
    # The ceilings again at the end: on a shared machine the load changes during the run, and the
    # fractions use the better of the two measurements.
    end = T.measure_ceilings(device, dtype, args.quick, cfg)
    ceilings = T.Ceilings(matmul_flops=max(ceilings.matmul_flops, end.matmul_flops), matmul_n=ceilings.matmul_n,
                          copy_bytes=max(ceilings.copy_bytes, end.copy_bytes), copy_mib=ceilings.copy_mib)
    meta["ceilings_start"], meta["ceilings_end"] = meta["ceilings"], end.as_dict()
    meta["ceilings"] = ceilings.as_dict()
    for row in rows:
        if row["median"]:
            row["frac_matmul"] = row["flops"] / row["median"] / ceilings.matmul_flops
            if row["bytes"] is not None:
                row["frac_copy"] = row["bytes"] / row["median"] / ceilings.copy_bytes
    meta["load_average_end"] = os.getloadavg()
    text = report.render(meta, rows)
    print()
    print(text)
    report.write_json(os.path.join(out_dir, "results.json"), meta, rows)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(text + "\n")
    if not args.no_plot:
        print(report.plot(os.path.join(out_dir, "speedup.png"), rows))
    print(f"results written to {os.path.relpath(out_dir)}")
    return 1 if any(r["status"] == "error" for r in rows) else 0
