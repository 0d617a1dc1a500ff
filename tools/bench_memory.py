"""The largest pretraining batch that fits in a memory budget, with and without activation checkpointing.

    python -m tools.bench_memory                          # convnextv2_huge, 224x224, 24 GiB, CPU
    python -m tools.bench_memory --model convnextv2_base --limit-gib 16 --json out.json

Each measurement is one full pretraining step (forward, backward, AdamW, which allocates its state in that step)
in a fresh process, so its peak resident memory (VmHWM) is the step's alone. Peak memory is close to linear in
the batch: two small batches give the line, the largest batch under the budget is predicted from it and then
measured (and stepped down while it does not fit). The budget is also capped by the memory this machine has
free, so the search never runs the machine out of memory.
"""
import json
import os
import subprocess
import sys
import time

GIB = 2 ** 30


def step_peak(model: str, size: int, batch: int, checkpointing: bool, backend: str, threads: int) -> dict:
    """Run in a child process: one pretraining step; peak RSS in bytes and the step's seconds."""
    import torch

    from fcmae.runtime.optim import adamw
    from fcmae.runtime.step import train_step
    from models import create_fcmae, random_mask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fcmae = create_fcmae(model, backend=backend)
    fcmae.encoder.grad_checkpointing = checkpointing
    optimizer = adamw(fcmae.parameters(), 1e-4, (0.9, 0.95), "cpu")
    imgs = torch.randn(batch, 3, size, size)
    mask = random_mask(batch, (size // 32) ** 2, 0.6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    t0 = time.perf_counter()
    loss = float(train_step(fcmae, [(imgs, mask)], optimizer, scaler, torch.device("cpu"), "none")[0])
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"batch": batch, "peak_bytes": peak, "step_seconds": seconds, "loss": loss}


def measure(args, batch: int, checkpointing: bool) -> dict:
    code = ("import json, sys; from tools.bench_memory import step_peak; "
            f"print(json.dumps(step_peak({args.model!r}, {args.input_size}, {batch}, {checkpointing}, "
            f"{args.backend!r}, {args.threads})))")
    row = f"  batch {batch:4d}  checkpointing {'on ' if checkpointing else 'off'}"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0:  # killed for memory, most likely
        error = (res.stderr.strip().splitlines() or [f"killed (exit {res.returncode})"])[-1]
        print(f"{row}  failed: {error}", flush=True)
        return {"batch": batch, "peak_bytes": None, "error": error}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{row}  peak {out['peak_bytes'] / GIB:6.2f} GiB  step {out['step_seconds']:7.1f} s", flush=True)
    return out


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def line_through(p: dict, q: dict):
    """(fixed bytes, bytes per image) of the line peak = fixed + per_image x batch through two measurements."""
    per_image = (q["peak_bytes"] - p["peak_bytes"]) / (q["batch"] - p["batch"])
    return p["peak_bytes"] - per_image * p["batch"], per_image


def largest_batch(args, checkpointing: bool, budget: int, measure=measure) -> dict:
    """Two probes give the line, the predicted batch is measured and stepped down (or the line refitted through
    an over-budget point) until one fits. `measure(args, batch, checkpointing)` -> {"batch", "peak_bytes" (None
    when the step died), ...}: a real step in a fresh process, or a stand-in in tests."""
    a, b = measure(args, args.probe_batches[0], checkpointing), measure(args, args.probe_batches[1], checkpointing)
    for probe in (a, b):
        if probe["peak_bytes"] is None:
            raise SystemExit(f"error: the probe step at batch {probe['batch']} failed: {probe['error']}")
    fixed, per_image = line_through(a, b)
    if per_image <= 0:  # memory noise larger than the batch's share: the line says nothing
        raise SystemExit(f"error: peak memory did not grow from batch {a['batch']} to {b['batch']}; "
                         "use larger --probe-batches")
    batch = max(int((budget - fixed) // per_image), 1)
    tried = [a, b]
    while batch >= 1:
        res = measure(args, batch, checkpointing)
        tried.append(res)
        if res["peak_bytes"] is not None and res["peak_bytes"] <= budget:
            break
        if res["peak_bytes"] is None or res["batch"] <= b["batch"]:  # killed, or no room left to refit
            batch = min(int(batch * 0.9), batch - 1)
            continue
        # over budget: the line through the small probe and this point is the better estimate at this scale
        fixed, per_image = line_through(a, res)
        batch = min(int((budget - fixed) // per_image), batch - 1)
    if res["peak_bytes"] is None or res["peak_bytes"] > budget:
        raise SystemExit(f"error: not even batch 1 fits in {budget / GIB:.1f} GiB "
                         f"(checkpointing {'on' if checkpointing else 'off'})")
    best = narrow(args, checkpointing, budget, measure, res, tried)
    return {"checkpointing": checkpointing, "fixed_bytes": fixed, "per_image_bytes": per_image, "best": best,
            "measurements": tried}


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def narrow(args, checkpointing: bool, budget: int, measure, best: dict, tried: list) -> dict:
    """The first batch that fits may lie well below the largest one (memory grows faster than linearly at scale,
    so the line through an over-budget point over-estimates the per-image cost): narrow the gap to the smallest
    failing batch above it to within 2%, by the secant between the two (bisection when the failure was a kill)."""
    def fits(m):
        return m["peak_bytes"] is not None and m["peak_bytes"] <= budget

    while True:
        above = [m for m in tried if not fits(m) and m["batch"] > best["batch"]]
        if not above:
            return best
        hi = min(above, key=lambda m: m["batch"])
        if hi["batch"] - best["batch"] <= max(1, best["batch"] // 50):
            return best
        guess = (best["batch"] + hi["batch"]) // 2
        if hi["peak_bytes"] is not None:
            slope = (hi["peak_bytes"] - best["peak_bytes"]) / (hi["batch"] - best["batch"])
            guess = best["batch"] + int((budget - best["peak_bytes"]) // slope)
            guess = min(max(guess, best["batch"] + 1), hi["batch"] - 1)
        res = measure(args, guess, checkpointing)
        tried.append(res)
        if fits(res):
            best = res


def main(argv=None):
    from fcmae.runtime.cli import check_output_file
    from fcmae.runtime.errors import UsageError
    from fcmae.runtime.options import ArgParser, Float, Int, Str, add, parse_with_config

    p = ArgParser(prog="python -m tools.bench_memory", description=__doc__.split("\n\n")[0])
    add(p, "--model", kind=Str(), default="convnextv2_huge", help="variant to measure (default: convnextv2_huge)")
    add(p, "--input-size", kind=Int(min=32), default=224, help="square input size in pixels, divisible by 32")
    add(p, "--backend", kind=Str(["sparse", "dense", "minkowski"]), default="sparse",
        help="encoder backend (default: sparse)")
    add(p, "--limit-gib", kind=Float(min=0, open_min=True), default=24.0,
        help="memory budget in GiB; capped by what the machine has free (default: 24)")
    add(p, "--probe-batches", kind=Int(min=1), nargs=2, default=[1, 3], metavar=("SMALL", "LARGER"),
        help="two batch sizes measured first to fit the line memory = fixed + per-image x batch")
    add(p, "--threads", kind=Int(min=1), default=os.cpu_count(), help="torch threads (default: all cores)")
    add(p, "--json", kind=Str(), default=None, metavar="PATH", help="also write every measurement as JSON")
    try:
        args = parse_with_config(p, argv)
        if args.json:
            check_output_file(args.json, "--json")
    except UsageError as e:
        fail(str(e))
    from models import VARIANTS
    if args.model not in VARIANTS:
        fail(f"unknown model {args.model!r}; valid: {', '.join(VARIANTS)}")
    if args.input_size <= 0 or args.input_size % 32:
        fail(f"--input-size must be a positive multiple of 32, got {args.input_size}")
    small, larger = args.probe_batches
    if not 1 <= small < larger:
        fail(f"--probe-batches needs 1 <= SMALL < LARGER, got {small} {larger}")
    budget = min(args.limit_gib * GIB, available_bytes() - GIB // 2)
    print(f"{args.model} at {args.input_size}, {args.backend} backend: budget {budget / GIB:.1f} GiB "
          f"(--limit-gib {args.limit_gib}, capped by this machine's free memory)", flush=True)
    results = [largest_batch(args, cp, budget) for cp in (False, True)]
    for r in results:
        best = r["best"]
        print(f"checkpointing {'on ' if r['checkpointing'] else 'off'}: largest batch {best['batch']}, peak "
              f"{best['peak_bytes'] / GIB:.2f} GiB, step {best['step_seconds']:.1f} s "
              f"({best['batch'] / best['step_seconds']:.2f} img/s); {r['fixed_bytes'] / GIB:.2f} GiB fixed + "
              f"{r['per_image_bytes'] / 2 ** 20:.0f} MiB per image")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "input_size": args.input_size, "budget_bytes": budget,
                       "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
