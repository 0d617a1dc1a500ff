"""The Fashion-MNIST experiment's command: `python -m tools.experiment_fashion_mnist [--study ablations|evidence]`.

- `--study ablations` (the default): the ConvNeXt V2 paper's FCMAE ablations at small scale, arm by arm, with seeds
  and error bars (tools/experiment_ablations.py, whose docstring describes the arms and budgets);
- `--study evidence`: the protocol of docs/experiment/protocol.md (a validation split for every choice, tuned
  scratch, 3 pretraining seeds, the test set read once per final configuration; tools/experiment_evidence.py).
Both run the project's CLIs as stages in --work-dir, reused across invocations once finished.
"""
import argparse
import os
import sys

from tools import experiment_evidence
from tools.experiment_ablations import ALIASES, ARMS, BUDGETS, resolve_arms, run_ablations


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tools.experiment_fashion_mnist", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", nargs="+", default=["all"], metavar="ARM",
                   help=f"arms to run: {', '.join(ARMS)} or all (default; aliases "
                        + ", ".join(f"{k}={v}" for k, v in ALIASES.items()) + "); finished arms of earlier "
                        "invocations are reported too")
    p.add_argument("--study", choices=["ablations", "evidence"], default="ablations",
                   help="ablations: the arms under --budget (below); evidence: the protocol of "
                        "docs/experiment/protocol.md (tools/experiment_evidence.py; --budget full, the default, or "
                        "smoke; --arm does not apply)")
    p.add_argument("--budget", choices=sorted(set(BUDGETS) | set(experiment_evidence.STUDIES)), default=None,
                   help="ablations: default (the default; about 2 h on a 2-core CPU for all arms); long: the default "
                        "with 4 pretraining epochs (run it for v2-fcmae and scratch: ~30 min more); full: 5 epochs, 2 "
                        "pretraining seeds; smoke: seconds, for the tests. evidence: full (the default) or smoke")
    p.add_argument("--report-only", action="store_true",
                   help="evidence: run nothing, write the results of what WORK_DIR holds")
    p.add_argument("--work-dir", default="output/experiment_fashion_mnist", help="runs and checkpoints")
    p.add_argument("--out", default=None, help="results (default: WORK_DIR/results)")
    p.add_argument("--num-workers", type=int, default=2)
    return p


def main(argv=None) -> dict:
    from fcmae.runtime.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.work_dir, "results")
    if args.study == "evidence":
        if args.arm != ["all"]:
            parser.error("--arm is for --study ablations; the evidence study runs its fixed plan")
        budget = args.budget or "full"
        if budget not in experiment_evidence.STUDIES:
            parser.error(f"--study evidence takes --budget {' or '.join(experiment_evidence.STUDIES)}, not {budget}")
        setup_logging(None)
        return experiment_evidence.main(budget, args.work_dir, out, args.num_workers, run=not args.report_only)
    budget = args.budget or "default"
    if budget not in BUDGETS:
        parser.error(f"--study ablations takes --budget {', '.join(BUDGETS)}, not {budget}")
    try:
        selected = resolve_arms(args.arm)
    except ValueError as e:
        parser.error(str(e))
    return run_ablations(budget, selected, args.work_dir, out, args.num_workers)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
