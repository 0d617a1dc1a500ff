"""What a fine-tuning run leaves next to its checkpoints: summary.csv (one row per evaluation), TensorBoard
scalars and metrics.json. Rows live in the checkpoint, so after a resume the files are rewritten from it and
never hold rows of steps that were lost."""
import csv
import json
import os
from typing import Dict, List, Optional

SUMMARY_FIELDS = ["epoch", "step", "train_loss", "acc1", "acc5", "val_loss", "ema_acc1"]


def summary_row(epoch: int, step: int, train_loss: float, stats: Dict, ema_stats: Optional[Dict]) -> Dict:
    return {"epoch": epoch, "step": step, "train_loss": train_loss, "acc1": stats["acc1"], "acc5": stats["acc5"],
            "val_loss": stats["loss"], "ema_acc1": ema_stats["acc1"] if ema_stats else None}


def write_summary(output_dir: str, rows: List[Dict]):
    with open(os.path.join(output_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row[k] is None else row[k] for k in SUMMARY_FIELDS})


def log_scalars(writer, row: Dict):
    if writer is None:
        return
    for key in ["acc1", "acc5", "val_loss", "ema_acc1"]:
        if row[key] is not None:
            writer.add_scalar(f"val/{key}", row[key], row["step"])
    writer.add_scalar("train/epoch_loss", row["train_loss"], row["step"])
    writer.flush()


def final_metrics(model: str, step: int, losses: List[float], rows: List[Dict], best: Dict) -> Dict:
    last = rows[-1] if rows else {}
    return {"model": model, "steps": step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "mean_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "acc1": last.get("acc1"), "acc5": last.get("acc5"), "ema_acc1": last.get("ema_acc1"),
            "best_acc1": best.get("acc1"), "best_source": best.get("source"), "best_step": best.get("step")}


def write_metrics(output_dir: str, metrics: Dict):
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
