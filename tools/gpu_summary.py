"""The records and the summary of tools/gpu_check.sh's output folder, which works on whatever part of it exists
(a check cut short keeps the steps it finished).

    python -m tools.gpu_summary probe OUTDIR [--dry-run]           # the interpreter, its packages and the device
    python -m tools.gpu_summary record OUTDIR NAME EXIT_CODE SECONDS LIMIT [--junit FILE]
    python -m tools.gpu_summary OUTDIR                              # prints summary.md

`probe` writes status.json's "device" (Python, the packages the project imports and their versions, the GPU) and
exits 2 where a required package is missing or, without --dry-run, torch sees no GPU. `record` adds one step's exit
code, seconds and limit to status.json (exit code 124 or 137: the step hit its time limit), with --junit the
pytest results (counts, failures, recorded properties). The summary reads status.json, steps.json,
compiled.json, loader.json and pretrain.json.
"""
import importlib.util
import json
import os
import platform
import sys
import xml.etree.ElementTree as ET
from importlib import metadata

from fcmae.runtime.files import write_text

STATUS = "status.json"
# module -> distribution: versions are read from the installed metadata, without importing (seconds on a cold disk)
REQUIRED = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "yaml": "PyYAML", "PIL": "Pillow",
            "numpy": "numpy"}
OPTIONAL = {"tifffile": "tifffile", "safetensors": "safetensors", "tensorboard": "tensorboard",
            "skimage": "scikit-image", "imagecodecs": "imagecodecs", "MinkowskiEngine": "MinkowskiEngine",
            "pytest": "pytest"}
TIMED_OUT = (124, 137)  # GNU timeout's codes: the limit's SIGTERM, the SIGKILL after it


def _load(out: str, name: str):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # not written (yet), or cut short while written by a tool without atomic writes
        return None


def _save_status(out: str, status: dict):
    write_text(os.path.join(out, STATUS), json.dumps(status, indent=1))


# ---------------------------------------------------------------- probe and record


def probe(out: str, dry_run: bool) -> int:
    packages = {}
    for module, dist in {**REQUIRED, **OPTIONAL}.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        try:
            packages[module] = metadata.version(dist) if found else None
        except metadata.PackageNotFoundError:  # importable but not installed as a distribution (PYTHONPATH)
            packages[module] = "present"
    device = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
              "packages": packages, "dry_run": dry_run}
    missing = [n for n in REQUIRED if not packages[n]]
    if not missing:
        import torch

        device.update(cuda=torch.version.cuda, gpu_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            device.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                          gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                          multiprocessors=props.multi_processor_count)
    status = _load(out, STATUS) or {"steps": []}
    status["device"] = device
    _save_status(out, status)
    print(json.dumps(device, indent=1))
    if missing:
        print(f"error: {sys.executable} lacks {', '.join(missing)}: run with a Python that has the project's "
              "dependencies (PYTHON=...)", file=sys.stderr)
        return 2
    if not dry_run and not device["gpu_available"]:
        print(f"error: torch {packages['torch']} in {sys.executable} sees no GPU; on a machine without one run "
              "`bash tools/gpu_check.sh --dry-run OUTDIR`", file=sys.stderr)
        return 2
    return 0


def junit_results(path: str) -> dict:
    """Counts, failures (test and first line of the message) and recorded properties of a pytest junit file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed, properties = [], {}
    for case in suite.iter("testcase"):
        name = case.get("name")
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or tag).splitlines() or [tag]
                failed.append(f"{name}: {message[0][:200]}")
        for prop in case.iter("property"):
            properties[f"{name}: {prop.get('name')}"] = prop.get("value")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts, failed=failed, properties=properties)


def record(out: str, name: str, exit_code: int, seconds: int, limit: int, junit=None):
    status = _load(out, STATUS) or {"steps": []}
    entry = {"name": name, "exit_code": exit_code, "seconds": seconds, "limit_s": limit,
             "timed_out": exit_code in TIMED_OUT}
    if junit:
        entry["tests"] = junit_results(junit) if os.path.exists(junit) else None
    status["steps"] = [s for s in status["steps"] if s["name"] != name] + [entry]
    _save_status(out, status)


# ---------------------------------------------------------------- summary


def _device_line(device: dict) -> str:
    if not device:
        return "Device: not probed"
    pk = device.get("packages", {})
    gpu = device.get("gpu") or ("CPU (dry run)" if device.get("dry_run") else "no GPU")
    if device.get("gpu"):
        gpu += (f" ({device.get('gpu_memory_gib')} GiB, capability {device.get('capability')}, "
                f"CUDA {device.get('cuda')})")
    versions = ", ".join(f"{n} {pk.get(n)}" for n in ("torch", "torchvision", "timm") if pk.get(n))
    absent = [n for n in OPTIONAL if not pk.get(n)]
    return (f"Device: {gpu}; Python {device.get('python')}, {versions}; {device.get('cpus')} CPUs"
            + (f"; absent: {', '.join(absent)}" if absent else ""))


def _steps_section(status: dict):
    lines = ["| step | exit code | seconds | limit |", "|---|---|---|---|"]
    for s in status.get("steps", []):
        code = f"{s['exit_code']} (time limit)" if s.get("timed_out") else str(s["exit_code"])
        lines.append(f"| {s['name']} | {code} | {s['seconds']} | {s['limit_s']} |")
    for s in status.get("steps", []):
        tests = s.get("tests")
        if tests:
            lines += ["", f"Tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                          f"{tests['skipped']} skipped"]
            lines += [f"- FAILED {f}" for f in tests["failed"]]
            lines += [f"- {k} = {v}" for k, v in tests["properties"].items()]
    return lines


def _bench_section(title: str, steps: dict):
    lines = ["", f"## {title}" + ("" if steps.get("complete") else " (cut short: the configurations it finished)"),
             "", "| config | candidate | median ms | min ms | images/s | peak MiB |", "|---|---|---|---|---|---|"]
    for res in steps["results"]:
        cfg = f"{res['variant']} {res['input_size'][0]} b{res['batch_size']}"
        for name, r in res["candidates"].items():
            if "median_s" in r:
                mem = r.get("peak_memory_bytes")
                lines.append(f"| {cfg} | {name} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | "
                             f"{r['images_per_s']:.1f} | {'n/a' if mem is None else f'{mem / 2 ** 20:.0f}'} |")
            else:
                lines.append(f"| {cfg} | {name} | failed: {r.get('error', '?')[:80]} | | | |")
    ratios = [(res, key, value) for res in steps["results"] for key, value in res["ratios"].items()
              if value is not None and res["ratios_min"].get(key) is not None]
    if ratios:
        lines += ["", "| config | ratio | median | min | target |", "|---|---|---|---|---|"]
        for res, key, value in ratios:
            cfg = f"{res['variant']} {res['input_size'][0]} b{res['batch_size']}"
            lines.append(f"| {cfg} | {key} | {value:.3f} | {res['ratios_min'][key]:.3f} | "
                         f"{res['targets'][key]['target']} |")
    return lines


def _loader_section(loader: dict):
    lines = ["", "## Input pipeline" + ("" if loader.get("complete") else " (cut short)"), "",
             f"images/s, batch {loader['batch_size']}, {'x'.join(map(str, loader['input_size']))}, "
             f"{loader.get('device_name', loader['device'])}, {loader['cpus']} CPUs; ratio: to the reference recipe "
             "(median of the rounds / median of the per-round ratios)", "",
             "| workers | candidate | median | min | ratio | paired ratio |", "|---|---|---|---|---|---|"]
    for run in loader["runs"]:
        for name in ("baseline", "ours", "ours_loader", "ours_device"):
            r = run.get(name)
            if r:
                ratio = f"{r['ratio']:.2f} | {r['paired_ratio']:.2f}" if "ratio" in r else " | "
                lines.append(f"| {run['workers']} | {name} | {r['median']:.1f} | {r['min']:.1f} | {ratio} |")
    return lines


def _pretrain_section(pre: dict):
    lines = ["", "## Stop and resume under torchrun" + ("" if pre.get("complete") else " (cut short)"), ""]
    stopped, resumed = pre.get("stopped"), pre.get("resumed")
    if stopped:
        lines.append(f"- SIGTERM at step {stopped['signalled_at_step']}: checkpoint at step {stopped['saved_step']}, "
                     f"torchrun exit code {stopped['exit_code']}, {stopped['seconds']} s")
    if resumed:
        rates = [r for s, r in resumed["images_per_s"][1:]]  # the first step after a (re)start compiles
        rate = f", median {sorted(rates)[len(rates) // 2]:.0f} img/s after the first step" if rates else ""
        lines.append(f"- resumed from step {resumed['resumed_from']} to {resumed['final_step']}, exit code "
                     f"{resumed['exit_code']}, {resumed['seconds']} s{rate}")
    curve = pre.get("curve")
    if curve:
        lines.append(f"- losses: first {curve['losses'][0]:.4f}, last {curve['losses'][-1]:.4f}, all finite: "
                     f"{all(curve['finite'])}")
    if "passed" in pre:
        lines.append(f"- {'passed' if pre['passed'] else 'FAILED'}")
    return lines


def summary(out: str) -> str:
    status = _load(out, STATUS) or {}
    lines = ["# GPU check", "", _device_line(status.get("device")), ""] + _steps_section(status)
    for name, title in (("steps.json", "Training steps"), ("compiled.json", "Compiled training steps")):
        steps = _load(out, name)
        if steps and steps.get("results"):
            lines += _bench_section(title, steps)
    loader = _load(out, "loader.json")
    if loader and loader.get("runs"):
        lines += _loader_section(loader)
    pre = _load(out, "pretrain.json")
    if pre:
        lines += _pretrain_section(pre)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return probe(argv[1], "--dry-run" in argv[2:])
    if argv[:1] == ["record"]:
        junit = argv[argv.index("--junit") + 1] if "--junit" in argv else None
        record(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]), junit)
        return 0
    print(summary(argv[0]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
