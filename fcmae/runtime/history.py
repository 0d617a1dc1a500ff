"""The loss record a checkpoint keeps: bounded, whatever the run's length."""
from typing import List, Optional

HISTORY_POINTS = 2048  # bound on the loss curve kept in checkpoints (TensorBoard has every step)


class LossHistory:
    """Bounded loss record: the first loss, the last 10, and a curve of at most HISTORY_POINTS (step, mean loss)
    points whose span doubles (neighbours merged) whenever it fills up."""

    def __init__(self, state: Optional[dict] = None):
        state = state or {}
        self.first = state.get("first")
        self.recent: List[float] = list(state.get("recent", []))
        self.curve: List[List[float]] = [list(p) for p in state.get("curve", [])]  # [last step, mean, count]
        self.span = state.get("span", 1)
        self.window = list(state.get("window", [0.0, 0]))  # loss sum and count since take_window()

    def take_window(self) -> float:
        """Mean loss since the previous call (e.g. over an epoch); NaN when no step was recorded."""
        total, count = self.window
        self.window = [0.0, 0]
        return total / count if count else float("nan")

    def add(self, step: int, loss: float):
        self.first = loss if self.first is None else self.first
        self.window = [self.window[0] + loss, self.window[1] + 1]
        self.recent = (self.recent + [loss])[-10:]
        if self.curve and self.curve[-1][2] < self.span:
            last = self.curve[-1]
            last[1] = (last[1] * last[2] + loss) / (last[2] + 1)
            last[0], last[2] = step, last[2] + 1
        else:
            self.curve.append([step, loss, 1])
        if len(self.curve) > HISTORY_POINTS:
            self.span *= 2
            merged = []
            for a, b in zip(self.curve[::2], self.curve[1::2] + [None]):
                merged.append(a if b is None else [b[0], (a[1] * a[2] + b[1] * b[2]) / (a[2] + b[2]), a[2] + b[2]])
            self.curve = merged

    def state(self) -> dict:
        return {"first": self.first, "recent": self.recent, "curve": self.curve, "span": self.span,
                "window": self.window}

    def summary(self) -> dict:
        if self.first is None:
            return {}
        return {"first_loss": self.first, "last_loss": self.recent[-1],
                "mean_last_10": sum(self.recent) / len(self.recent)}
