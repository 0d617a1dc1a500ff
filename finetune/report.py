"""What a fine-tuning run leaves next to its checkpoints: summary.csv (one row per evaluation), TensorBoard
scalars and the evaluation part of metrics.json. Rows live in the checkpoint, so after a resume the files are
rewritten from it and never hold rows of steps that were lost."""
import csv
import io
from typing import Dict, List, Optional

SUMMARY_FIELDS = ["epoch", "step", "train_loss", "acc1", "acc5", "val_loss", "ema_acc1"]


def summary_row(epoch: int, step: int, train_loss: float, stats: Dict, ema_stats: Optional[Dict]) -> Dict:
    """train_loss: the mean training loss since the previous evaluation."""
    return {"epoch": epoch, "step": step, "train_loss": train_loss, "acc1": stats["acc1"], "acc5": stats["acc5"],
            "val_loss": stats["loss"], "ema_acc1": ema_stats["acc1"] if ema_stats else None}


def summary_csv(rows: List[Dict]) -> str:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row[k] is None else row[k] for k in SUMMARY_FIELDS})
    return f.getvalue()


def log_scalars(writer, row: Dict):
    if writer is None:
        return
    for key in ["acc1", "acc5", "val_loss", "ema_acc1"]:
        if row[key] is not None:
            writer.add_scalar(f"val/{key}", row[key], row["step"])
    writer.add_scalar("train/epoch_loss", row["train_loss"], row["step"])
    writer.flush()


def final_metrics(rows: List[Dict], best: Dict) -> Dict:
    last = rows[-1] if rows else {}
    return {"acc1": last.get("acc1"), "acc5": last.get("acc5"), "ema_acc1": last.get("ema_acc1"),
            "best_acc1": best.get("acc1"), "best_source": best.get("source"), "best_step": best.get("step")}
