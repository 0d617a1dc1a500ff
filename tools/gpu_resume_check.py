"""A short pretraining run under torchrun, stopped with SIGTERM mid-run and resumed (tools/gpu_check.sh's last
step): the launcher, the stop signal's checkpoint, the resume and the whole pipeline on the machine at hand.

    python -m tools.gpu_resume_check --data FOLDER --work DIR --json PATH [--steps 30] [--stop-at 10]
        [--nproc 1] -- PRETRAIN_OPTIONS...

Runs `torchrun --standalone --nproc_per_node N -m fcmae.pretrain PRETRAIN_OPTIONS --data-path FOLDER --max-steps
STEPS --log-every 1 --output-dir DIR/run` and, once a progress line reports step STOP_AT, sends SIGTERM to torchrun
and its workers (as SLURM's scancel does); then runs the same command again, which must resume from the
checkpoint that the signal saved and finish. --json is written after each run (a check cut short keeps the first):
per run the exit code, seconds, the step saved or resumed from, the last progress lines' images/s; at the end the
loss curve of the checkpoint (steps, losses, finite flags).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.cli import exit_with
from fcmae.runtime.errors import RunStopped, UsageError
from fcmae.runtime.files import write_text
from fcmae.runtime.options import ArgParser, Int, Str, add, parse_with_config

PROGRESS = re.compile(r" step (\d+)/(\d+) .* ([\d.]+) img/s")


def descendants(pid: int):
    """The process ids below `pid` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_tree(pid: int, sig: int):
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def run(cmd, stop_at=None) -> dict:
    """Run `cmd`, echoing its output; with `stop_at`, SIGTERM to it and its descendants once step `stop_at` is
    reported. Returns the exit code, seconds, the lines and the images/s of each progress line. A SIGTERM to this
    process (gpu_check.sh's time limit) goes on to the run's processes, which torchrun starts in sessions of their
    own (a time limit's signal to this process group would miss them)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def stop(signum, frame):
        signal_tree(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    lines, rates, signalled = [], [], None
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
            m = PROGRESS.search(line)
            if m:
                rates.append((int(m.group(1)), float(m.group(3))))
                if stop_at is not None and signalled is None and int(m.group(1)) >= stop_at:
                    signalled = int(m.group(1))
                    signal_tree(proc.pid, signal.SIGTERM)
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {"exit_code": rc, "seconds": round(time.time() - t0, 1), "signalled_at_step": signalled,
            "images_per_s": rates, "lines": lines}


def summary(result: dict) -> dict:
    """The JSON's view of a run: the last 40 lines, not all."""
    return {k: (v[-40:] if k == "lines" else v) for k, v in result.items()}


def check(argv=None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parse_with_config(build_parser(), argv[:split])
    pretrain = argv[split + 1:]
    if not 1 <= args.stop_at < args.steps:
        raise UsageError(f"--stop-at must lie between 1 and --steps - 1 ({args.steps - 1}), got {args.stop_at}")
    out = os.path.join(args.work, "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "fcmae.pretrain"] + pretrain + ["--data-path", args.data, "--max-steps", str(args.steps),
                                                 "--log-every", "1", "--output-dir", out]
    report = {"command": cmd, "steps": args.steps, "stop_at": args.stop_at, "complete": False}
    stopped = run(cmd, stop_at=args.stop_at)
    saved = ckpt.latest_loadable(out)[1] if os.path.isdir(out) else None
    report["stopped"] = dict(summary(stopped), saved_step=saved["step"] if saved else None,
                             said_stopped=any("checkpoint saved at step" in line for line in stopped["lines"]))
    write_text(args.json, json.dumps(report, indent=1))
    resumed = run(cmd)
    final = ckpt.latest_loadable(out)[1] if os.path.isdir(out) else None
    resumed_from = next((int(m.group(1)) for line in resumed["lines"]
                         for m in [re.search(r"resumed from .* at step (\d+)", line)] if m), None)
    report["resumed"] = dict(summary(resumed), resumed_from=resumed_from, final_step=final["step"] if final else None)
    if final:
        curve = final["history"]["curve"]
        report["curve"] = {"steps": [p[0] for p in curve], "losses": [p[1] for p in curve],
                           "finite": [bool(p[2]) for p in curve]}
    report["complete"] = True
    report["passed"] = bool(
        stopped["exit_code"] != 0 and report["stopped"]["said_stopped"] and saved is not None
        and resumed["exit_code"] == 0 and resumed_from == saved["step"] and final and final["step"] == args.steps
        and all(report["curve"]["finite"]) and report["curve"]["steps"] == list(range(1, args.steps + 1)))
    write_text(args.json, json.dumps(report, indent=1))
    print(f"stopped at step {report['stopped']['saved_step']} (torchrun's exit code {stopped['exit_code']}), resumed "
          f"from {resumed_from}, finished at {report['resumed']['final_step']}: "
          f"{'passed' if report['passed'] else 'FAILED'}")
    if not report["passed"]:
        raise RunStopped(f"the stop-and-resume check failed (details in {args.json})", 1)
    return report


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m tools.gpu_resume_check", description=__doc__.split("\n\n")[0])
    add(p, "--data", kind=Str(), required=True, help="image folder or shards (--data-path)")
    add(p, "--work", kind=Str(), required=True, help="folder for the run's output (DIR/run)")
    add(p, "--json", kind=Str(), required=True)
    add(p, "--steps", kind=Int(min=2), default=30)
    add(p, "--stop-at", kind=Int(min=1), default=10, help="send SIGTERM once this step is reported")
    add(p, "--nproc", kind=Int(min=1), default=1, help="torchrun processes")
    return p


if __name__ == "__main__":
    exit_with(check)
