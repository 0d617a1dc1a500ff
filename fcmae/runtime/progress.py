"""Progress display: one line every few steps with smoothed loss, lr, throughput and ETA."""
import datetime
import logging
import time

log = logging.getLogger("fcmae")


class Progress:
    def __init__(self, total_steps: int, start_step: int, every: int = 20):
        self.total, self.every = total_steps, max(1, every)
        self.t0, self.step0 = time.time(), start_step
        self.window_t, self.window_imgs = time.time(), 0
        self.loss_avg = None

    def update(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float, images: int):
        """Returns images/s over the last window when a line is printed, else None."""
        self.window_imgs += images
        self.loss_avg = loss if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * loss
        if step % self.every and step != self.total:
            return None
        now = time.time()
        rate = self.window_imgs / max(now - self.window_t, 1e-9)
        per_step = (now - self.t0) / max(step - self.step0, 1)
        eta = datetime.timedelta(seconds=int(per_step * (self.total - step)))
        log.info("epoch %d step %d/%d (%.0f%%) loss %.4f (avg %.4f) lr %.3e grad %.3f %.1f img/s eta %s",
                 epoch, step, self.total, 100.0 * step / self.total, loss, self.loss_avg, lr, grad_norm, rate, eta)
        self.window_t, self.window_imgs = now, 0
        return rate
