"""Benchmark FCMAE pretraining steps per encoder backend against timm's plain supervised step.

    python -m tools.benchmark                   # the target configuration: atto, 224x224, batch 32, mask 0.6
    python -m tools.benchmark --scaling         # the scaling table of docs/results.md (sparse vs dense), as markdown
    python -m tools.benchmark --variants atto tiny --input-sizes 128 192x256 --batch-sizes 8 --json out.json
    python -m tools.benchmark --amp none bf16    # every candidate in float32 and under bf16 autocast
    python -m tools.benchmark --compile          # adds the compiled sparse step (sparse+compile)
    python -m tools.benchmark --candidates sparse sparse+compile --no-memory   # only these, no memory figures
    python -m tools.benchmark --data FOLDER_OR_SHARDS   # the input pipeline instead (tools/bench_loader.py)

Candidates, each one full optimiser step on a fixed synthetic batch (same seed, same images and masks):
  sparse, dense, minkowski  FCMAE pretraining step (fcmae.runtime.step.train_step, fused AdamW from fcmae.runtime.optim) per
                            backend; minkowski only where MinkowskiEngine imports
  sparse+compile            the sparse step with the model compiled (--compile; the first, discarded round compiles)
  timm                      a bare supervised step of timm's dense model of the same variant: cross-entropy, AdamW
  finetune                  our fine-tuning step: the timm classifier wrapped as finetune does (WithLoss, layer-decay
                            AdamW from finetune.layer_decay, fcmae.runtime.step.train_step)
With --amp, every candidate runs in every precision given (bf16; fp16 on CUDA only), named e.g. `sparse/bf16`.

Timing: candidates are interleaved over rounds (the order rotates every round), so load drift on a shared machine
hits them alike; a first warm-up round is discarded. Reported: median, min, max, images/s; every ratio is computed
from the medians and from the per-round minimums (the minimum is what a quiet machine gives: robust to load).
Peak memory: the peak above the pre-step baseline over two steps (optimizer state, gradients, activations). On CPU
each candidate runs in its own fresh process, so peaks cannot mix (RSS high-water mark; /proc/self/clear_refs
resets it after the model is built); on CUDA torch.cuda.max_memory_allocated after a reset.
"""
import gc
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

# timm, models, fcmae and finetune are imported where used: `main` starts the memory processes' fork server first,
# so that it imports them (seconds) while this process does the same, not after

BACKENDS = ("sparse", "dense", "minkowski")
CANDIDATES = BACKENDS + ("timm", "finetune", "sparse+compile")
MEMORY_STEPS = 2  # the first step also allocates the optimiser state
MEMORY_PROCESSES = 2  # memory processes run side by side (peaks are per process, so they do not mix)

# (numerator, denominator, what, target test, target text), candidates named "name/amp": sparse/x < 1 means sparse
# is faster / smaller. A ratio whose candidates were not run is left out.
RATIOS = {
    "sparse_over_dense_time": ("sparse/none", "dense/none", "time", lambda r: r <= 0.5, "<= 0.50 (>= 2.0x faster)"),
    "sparse_over_minkowski_time": ("sparse/none", "minkowski/none", "time", lambda r: r <= 0.4,
                                   "<= 0.40 (>= 2.5x faster)"),
    "sparse_over_timm_supervised_time": ("sparse/none", "timm/none", "time", lambda r: r <= 0.45, "<= 0.45"),
    "sparse_over_dense_peak_memory": ("sparse/none", "dense/none", "memory", lambda r: r <= 0.6, "<= 0.60"),
    "finetune_over_bare_timm_time": ("finetune/none", "timm/none", "time", lambda r: abs(r - 1) <= 0.05,
                                     "1.00 +- 0.05"),
    "sparse_bf16_over_timm_float32_time": ("sparse/bf16", "timm/none", "time", lambda r: r <= 0.30, "<= 0.30"),
    "sparse_bf16_over_timm_bf16_time": ("sparse/bf16", "timm/bf16", "time", lambda r: r <= 0.45, "<= 0.45"),
    "sparse_bf16_over_dense_bf16_time": ("sparse/bf16", "dense/bf16", "time", lambda r: r <= 1 / 1.5,
                                         "<= 0.67 (>= 1.5x faster)"),
    "compiled_over_eager_sparse_time": ("sparse+compile/none", "sparse/none", "time", lambda r: r <= 1.0, "<= 1.00"),
}

# --scaling: one axis at a time around the base point (the first value of each list)
SCALING = {"variants": ["atto", "tiny", "base"], "input_sizes": [(224, 224), (128, 128), (384, 384)],
           "mask_ratios": [0.6, 0.4, 0.75], "batch_sizes": [8], "rounds": 2}
DEFAULTS = {"variants": ["atto"], "input_sizes": [(224, 224)], "mask_ratios": [0.6], "batch_sizes": [32], "rounds": 8}


def quiet():
    warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY")


def minkowski_available() -> bool:
    from models.minkowski_compat import import_minkowski

    try:
        import_minkowski()
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------------
# Candidates


def build(candidate: str, cfg: dict, device: torch.device):
    """A zero-argument function running one optimiser step of `candidate` ("name/amp") on a fixed synthetic batch."""
    import timm

    from fcmae.runtime.optim import adamw
    from fcmae.runtime.step import autocast, train_step
    from models import create_fcmae, random_mask
    from models.masking import mask_grid
    from models.variants import get_variant

    name, amp = candidate.split("/")
    torch.manual_seed(0)  # the same initial weights for every FCMAE backend, the same images for everyone
    model_name = get_variant(cfg["variant"]).name
    (h, w), batch, c = cfg["input_size"], cfg["batch_size"], cfg.get("in_chans", 3)
    imgs = torch.randn(batch, c, h, w).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    backend = name.split("+")[0]
    if backend in BACKENDS:
        from timm.optim import param_groups_weight_decay

        rows, cols = mask_grid(h, w)
        mask = random_mask(batch, rows * cols, cfg["mask_ratio"], generator=torch.Generator().manual_seed(0))
        model = create_fcmae(model_name, backend=backend, mask_ratio=cfg["mask_ratio"], in_chans=c).to(device)
        if name.endswith("+compile"):
            from models.fcmae import compile_for_training

            compile_for_training(model)
        groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=["mask_token"])
        optimizer = adamw(groups, 1.5e-4 * batch / 256, (0.9, 0.95), device.type)
        micro = [(imgs, mask.to(device))]
        threads = torch.get_num_threads()

        def sparse_step():
            try:
                return train_step(model, micro, optimizer, scaler, device, amp)
            finally:  # MinkowskiEngine's CPU kernels reset torch's thread count: keep --threads for everyone
                torch.set_num_threads(threads)

        return sparse_step
    labels = torch.randint(0, 1000, (batch,)).to(device)
    if name == "timm":
        model = timm.create_model(model_name, num_classes=1000, in_chans=c).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                loss = F.cross_entropy(model(imgs).float(), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return step
    if name == "finetune":
        from finetune.loss import WithLoss
        from finetune.layer_decay import build_optimizer
        from finetune.model import create_classifier

        model = create_classifier(model_name, 1000, 0.0, c).to(device)
        net = WithLoss(model, torch.nn.CrossEntropyLoss())
        optimizer = build_optimizer(model, get_variant(model_name).depths, lr=2e-4 * batch / 256, weight_decay=0.05,
                                    layer_decay=0.9, layer_decay_type="single", device_type=device.type)
        micro = [(imgs, labels)]
        return lambda: train_step(net, micro, optimizer, scaler, device, amp)
    raise ValueError(f"unknown candidate {candidate}")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(steps: dict, rounds: int, device: torch.device, errors: dict) -> dict:
    """Seconds per step of every candidate over `rounds` interleaved rounds. A candidate that fails is recorded in
    `errors` and dropped."""
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate, so no candidate always follows the same one
            if name in errors:
                continue
            sync(device)
            t0 = time.perf_counter()
            try:
                steps[name]()
            except Exception as e:  # e.g. a MinkowskiEngine built without CUDA, run with --device cuda
                errors[name] = f"{type(e).__name__}: {e}"
                continue
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------------
# Peak memory


def _proc_status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss():
    try:  # Linux: "5" resets the RSS high-water mark to the current RSS (peaks of model construction are dropped)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    peak = _proc_status_kb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_child(name, cfg, threads, conn):
    """Runs in a fresh process: build one candidate, run MEMORY_STEPS steps, send its peak."""
    quiet()
    try:
        if threads:
            torch.set_num_threads(threads)
        step = build(name, cfg, torch.device("cpu"))
        gc.collect()
        _reset_peak_rss()
        base = _proc_status_kb("VmRSS") or 0
        for _ in range(MEMORY_STEPS):
            step()
        peak = _peak_rss()
        conn.send({"peak_memory_bytes": peak - base, "peak_rss_bytes": peak})
    except Exception as e:  # reported in the table, the other candidates still run
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _process_context():
    """A fork server that has imported torch, timm and our packages (so children start in a second, not in the
    seven it takes to import them) but never ran an op: forking a process that has used OpenMP hangs the child.
    Spawn where there is no fork server."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # not this module itself: a child re-runs `python -m tools.benchmark`'s main module, and runpy warns when it
    # finds that module already imported
    ctx.set_forkserver_preload(["torch", "timm", "models", "fcmae.runtime.step", "fcmae.runtime.optim", "finetune.layer_decay"])
    return ctx


def start_process_context():
    """Start the fork server now: it imports torch and timm while the main process builds its candidates."""
    ctx = _process_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return ctx


def measure_memory(names, cfg, device, threads, ctx) -> dict:
    if device.type == "cuda":
        out = {}
        for name in names:
            gc.collect()
            torch.cuda.empty_cache()
            step = None
            try:
                step = build(name, cfg, device)
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                for _ in range(MEMORY_STEPS):
                    step()
                sync(device)
                peak = torch.cuda.max_memory_allocated(device)
                out[name] = {"peak_memory_bytes": peak - base, "peak_allocated_bytes": peak}
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"}
            del step
        return out
    out = {}
    for i in range(0, len(names), MEMORY_PROCESSES):  # a few at a time: each holds a whole model and its batch
        running = []
        for name in names[i:i + MEMORY_PROCESSES]:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_child, args=(name, cfg, threads, send))
            proc.start()
            send.close()
            running.append((name, proc, recv))
        for name, proc, recv in running:
            try:
                out[name] = recv.recv()
            except EOFError:  # killed, e.g. out of memory
                out[name] = {"error": f"memory process died (exit code {proc.exitcode})"}
            proc.join()
    return out


# --------------------------------------------------------------------------------------------------
# One configuration


def run_config(cfg: dict, names, rounds: int, device, threads, ctx, memory: bool = True) -> dict:
    steps, errors = {}, {}
    for name in names:
        try:
            steps[name] = build(name, cfg, device)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    time_rounds(steps, 1, device, errors)  # warm-up, discarded
    # memory between warm-up and timed rounds: the fork server imports while the candidates are built and warmed
    # up, and is idle (not competing for the cores) during the timed rounds
    memory = measure_memory([n for n in steps if n not in errors], cfg, device, threads, ctx) if memory else {}
    times = time_rounds(steps, rounds, device, errors)
    del steps
    gc.collect()
    results = {}
    for name in names:
        if name in errors:
            results[name] = {"amp": name.split("/")[1], "error": errors[name]}
            continue
        t = times[name]
        med = statistics.median(t)
        results[name] = {"amp": name.split("/")[1], "times_s": t, "median_s": med, "min_s": min(t), "max_s": max(t),
                         "images_per_s": cfg["batch_size"] / med, **memory.get(name, {})}
    ratios, ratios_min, targets = {}, {}, {}
    for key, (num, den, what, test, text) in RATIOS.items():
        if num not in names or den not in names:
            continue
        for out, field in ((ratios, "median_s" if what == "time" else "peak_memory_bytes"),
                           (ratios_min, "min_s" if what == "time" else "peak_memory_bytes")):
            a, b = results.get(num, {}).get(field), results.get(den, {}).get(field)
            out[key] = a / b if a is not None and b else None
        met = [bool(test(r)) for r in (ratios[key], ratios_min[key]) if r is not None]
        targets[key] = {"target": text, "met_median": met[0] if met else None, "met_min": met[-1] if met else None}
    return {**cfg, "input_size": list(cfg["input_size"]), "device": device.type, "rounds": rounds,
            "candidates": results, "ratios": ratios, "ratios_min": ratios_min, "targets": targets}


def print_config(res: dict):
    h, w = res["input_size"]
    print(f"\n{res['variant']} {h}x{w}, batch {res['batch_size']}, mask ratio {res['mask_ratio']} "
          f"({res['device']}, {torch.get_num_threads()} threads, {res['rounds']} timed rounds)")
    print(f"{'candidate':<21}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'images/s':>10}{'peak MiB':>10}")
    for name, r in res["candidates"].items():
        if "median_s" not in r:
            print(f"{name:<21}  unavailable: {r['error']}")
            continue
        mem = r.get("peak_memory_bytes")
        mem = f"{mem / 2 ** 20:10.0f}" if mem is not None else f"{'n/a':>10}"
        print(f"{name:<21}{r['median_s'] * 1e3:11.0f}{r['min_s'] * 1e3:9.0f}{r['max_s'] * 1e3:9.0f}"
              f"{r['images_per_s']:10.1f}{mem}" + (f"  (memory: {r['error']})" if "error" in r else ""))
    print(f"{'ratio':<38}{'median':>8}{'min':>8}  target")
    for key, value in res["ratios"].items():
        low = res["ratios_min"][key]
        if value is None or low is None:  # a candidate of the ratio failed
            continue
        t = res["targets"][key]
        verdict = "met" if t["met_median"] and t["met_min"] else ("met at the minimum" if t["met_min"] else "MISSED")
        print(f"{key:<38}{value:8.3f}{low:8.3f}  {t['target']:<26}{verdict}")


# --------------------------------------------------------------------------------------------------
# Scaling table


def scaling_configs(variants, sizes, ratios, batch):
    """Vary one of variant / input size / mask ratio at a time, the others at the base point (first values)."""
    base = {"variant": variants[0], "input_size": sizes[0], "batch_size": batch, "mask_ratio": ratios[0]}
    configs = [dict(base)]
    for key, values in (("variant", variants), ("input_size", sizes), ("mask_ratio", ratios)):
        configs += [{**base, key: v} for v in values[1:]]
    return configs


def scaling_table(results) -> str:
    lines = ["| variant | input | mask ratio | batch | sparse step (ms) | dense step (ms) | dense / sparse time "
             "| sparse peak (MiB) | dense peak (MiB) | sparse / dense memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        s, d = res["candidates"]["sparse/none"], res["candidates"]["dense/none"]

        def mb(r):
            return f"{r['peak_memory_bytes'] / 2 ** 20:.0f}" if r.get("peak_memory_bytes") is not None else "n/a"

        def ms(r):
            return f"{r['median_s'] * 1e3:.0f}" if "median_s" in r else "n/a"

        speed = f"{d['median_s'] / s['median_s']:.2f}x" if "median_s" in s and "median_s" in d else "n/a"
        mem = res["ratios"]["sparse_over_dense_peak_memory"]
        lines.append(f"| {res['variant']} | {res['input_size'][0]}x{res['input_size'][1]} | {res['mask_ratio']} "
                     f"| {res['batch_size']} | {ms(s)} | {ms(d)} | {speed} | {mb(s)} | {mb(d)} "
                     f"| {'n/a' if mem is None else f'{mem:.2f}'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI


def parse_size(text: str):
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def split_list(values, convert, option: str, what: str):
    out = []
    for v in (v for item in values for v in item.split(",") if v):
        try:
            out.append(convert(v))
        except ValueError:
            raise ValueError(f"{option}: {v!r} is not {what}") from None
    return out


def build_parser():
    from fcmae.runtime.options import ArgParser, Device, Int, Str, add

    p = ArgParser(prog="python -m tools.benchmark", description=__doc__.split("\n\n")[0])
    add(p, "--variants", kind=Str(), nargs="+", help="e.g. atto tiny (or atto,tiny); default atto")
    add(p, "--input-sizes", kind=Str(), nargs="+", help="224 or HxW, e.g. 192x256; default 224")
    add(p, "--batch-sizes", kind=Str(), nargs="+", help="default 32 (8 with --scaling)")
    add(p, "--mask-ratios", kind=Str(), nargs="+", help="default 0.6")
    add(p, "--in-chans", kind=Int(min=1, max=64), default=3, help="input channels of the synthetic batch")
    add(p, "--amp", kind=Str(["none", "bf16", "fp16"]), nargs="+", default=["none"],
        help="precisions to run every candidate in (fp16 only on CUDA), e.g. --amp none bf16")
    add(p, "--compile", action="store_true", help="also time the compiled sparse step (sparse+compile)")
    add(p, "--candidates", kind=Str(list(CANDIDATES)), nargs="+", default=None,
        help="time only these (default: all that run here; sparse+compile with --compile)")
    add(p, "--no-memory", action="store_true",
        help="skip the peak-memory measurement (it builds every candidate again: a compiled one compiles again)")
    add(p, "--threads", kind=Int(min=1), default=None, help="torch CPU threads (default: torch's default)")
    add(p, "--device", kind=Device(), default="cpu", help="cpu, cuda or cuda:N")
    add(p, "--rounds", kind=Int(min=1), default=None, help="timed rounds after the warm-up (default 8; 2 with --scaling)")
    add(p, "--json", kind=Str(), metavar="PATH", default=None,
        help="write every figure and ratio to PATH (rewritten after each configuration: a run cut short keeps what "
             "it measured, \"complete\": false)")
    add(p, "--scaling", action="store_true",
        help="sparse vs dense step time and memory vs variant (atto/tiny/base), input (128/224/384) and "
             "mask ratio (0.4/0.6/0.75), one axis at a time; prints a markdown table")
    add(p, "--data", kind=Str(), default=None,
        help="benchmark the input pipeline on this folder or these shards instead (python -m tools.bench_loader)")
    return p


def main(argv=None):
    from fcmae.runtime.cli import exit_with

    if argv is None:  # the command line: one `error:` line and exit code 2 for bad input
        exit_with(run_benchmark, argv)
    return run_benchmark(argv)


def run_benchmark(argv=None):
    from fcmae.runtime.cli import check_output_file
    from fcmae.runtime.errors import UsageError
    from fcmae.runtime.options import parse_with_config
    from models.masking import mask_grid, num_visible
    from models.variants import get_variant

    args = parse_with_config(build_parser(), argv)
    if args.data:
        from tools import bench_loader

        return bench_loader.run(["--data", args.data] + (["--json", args.json] if args.json else []))
    quiet()
    device = torch.device(args.device)
    if args.json:
        check_output_file(args.json, "--json")  # now, not after minutes of measurements
    if "fp16" in args.amp and device.type != "cuda":
        raise UsageError("--amp fp16 needs --device cuda (CPU autocast runs bf16)")
    defaults = SCALING if args.scaling else DEFAULTS
    rounds = args.rounds if args.rounds is not None else defaults["rounds"]
    try:  # fail now on bad input, not after minutes of measurements
        variants = split_list(args.variants, str, "--variants", "a name") if args.variants else defaults["variants"]
        sizes = split_list(args.input_sizes, parse_size, "--input-sizes", "a size: 224 or HxW") \
            if args.input_sizes else defaults["input_sizes"]
        batches = split_list(args.batch_sizes, int, "--batch-sizes", "an integer") \
            if args.batch_sizes else defaults["batch_sizes"]
        ratios = split_list(args.mask_ratios, float, "--mask-ratios", "a number") \
            if args.mask_ratios else defaults["mask_ratios"]
        for v in variants:
            get_variant(v)
        for h, w in sizes:
            rows, cols = mask_grid(h, w)
            for r in ratios:
                num_visible(rows * cols, r)
        if min(batches) < 1:
            raise ValueError("--batch-sizes must be >= 1")
    except ValueError as e:
        raise UsageError(str(e)) from None
    ctx = start_process_context() if device.type == "cpu" and not args.no_memory else None
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, variants, sizes, batches, ratios, rounds, device, ctx)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called from other code (tests)


def run(args, variants, sizes, batches, ratios, rounds, device, ctx):
    import timm

    if args.scaling:
        base = ["sparse", "dense"]
        configs = [c for b in batches for c in scaling_configs(variants, sizes, ratios, b)]
    else:
        if args.candidates:
            base = [n for n in CANDIDATES if n in args.candidates]
        else:
            base = [n for n in CANDIDATES if (n != "minkowski" or minkowski_available())
                    and (n != "sparse+compile" or args.compile)]
        configs = [{"variant": v, "input_size": s, "batch_size": b, "mask_ratio": r}
                   for v in variants for s in sizes for b in batches for r in ratios]
    # the MinkowskiEngine encoder runs in float32 whatever the autocast: only its float32 step is timed
    names = [f"{n}/{amp}" for amp in args.amp for n in base if amp == "none" or n != "minkowski"]
    results = []
    report = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "amp": list(args.amp), "candidates": names, "complete": False,
              "results": results}
    for cfg in configs:
        cfg["in_chans"] = args.in_chans
        res = run_config(cfg, names, rounds, device, args.threads, ctx, memory=not args.no_memory)
        print_config(res)
        sys.stdout.flush()
        results.append(res)
        save(report, args.json)
    report["complete"] = True
    if args.scaling:
        report["scaling_table"] = scaling_table(results)
        print("\n" + report["scaling_table"])
    save(report, args.json)
    return report


def save(report: dict, path):
    if path:
        from fcmae.runtime.files import write_text

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text(path, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
