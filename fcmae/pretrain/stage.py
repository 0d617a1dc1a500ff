"""The pretraining stage for the shared loop (fcmae.runtime.loop): the FCMAE model and what pretraining logs besides
the loss: reconstruction pictures and the collapse monitor (every --vis-every-epochs epochs), and the kNN
monitor (every --knn-every-epochs epochs) on a labelled set."""
import logging
import time
from typing import List, Optional

import torch

from fcmae.data.bad_samples import BadImageMonitor
from fcmae.runtime.loop import Loop, Stage

from .data import KnnSets, PretrainData
from .knn import all_visible_map, dense_encoder_map, knn_evaluate, pooled_features
from .monitor import collapse_scalars, collapse_stats, collapse_summary
from .options import FORMAT
from .visualize import reconstruction_grid

log = logging.getLogger("fcmae")


class KnnMonitor:
    """kNN top-1 of the encoder's pooled features, run densely (all patches visible) on labelled bank and query
    sets; costs one inference pass over both sets."""

    def __init__(self, sets: KnnSets, *, every_epochs: int, k: int = 20, batch_size: int = 256, num_workers: int = 0):
        self.sets, self.every, self.k = sets, every_epochs, k
        self.batch_size, self.num_workers = batch_size, num_workers

    def due(self, epochs_done: int, epoch_end: bool, last: bool) -> bool:
        return self.every > 0 and ((epoch_end and epochs_done % self.every == 0) or last)

    def __call__(self, encoder, device) -> dict:
        """The sets come normalised from fine-tuning's evaluation transform."""
        was_training = encoder.training
        encoder.eval()
        try:
            # per-image GRN (the default): the sparse backend's all-visible pass, the same values in half the time
            final_map = all_visible_map(encoder) if encoder.grn_stats == "sample" else dense_encoder_map(encoder)
            features = pooled_features(final_map)
            return knn_evaluate(features, self.sets.bank, self.sets.queries, self.sets.num_classes, device, k=self.k,
                                batch_size=self.batch_size, num_workers=self.num_workers)
        finally:
            encoder.train(was_training)


class PretrainStage(Stage):
    """`data`: the unlabelled images (their normalisation), `dataset`: what the loader reads (seeded, masked)."""

    format = FORMAT

    def __init__(self, *, model, net, data: PretrainData, dataset, vis_every_epochs: int = 1,
                 knn: Optional[KnnMonitor] = None, show_channels=None, description: str = ""):
        self.model, self.net, self.data = model, net, data
        self.vis_every, self.knn, self.show_channels = vis_every_epochs, knn, show_channels
        self.bad_images = BadImageMonitor(dataset)
        self.description = description
        # fixed images and masks: the first 4 for the reconstruction picture (comparable from epoch to epoch,
        # and drawn without touching the training RNG), up to 32 for the collapse monitor
        samples = [dataset[i] for i in range(min(32, len(dataset)))]
        self.monitor_imgs = data.stack([s[0] for s in samples])
        self.vis_masks = torch.stack([s[1] for s in samples[:4]])
        self.collapse: dict = {}
        self.knn_results: List[dict] = []

    def describe(self) -> str:
        return self.description

    def poll_data(self):
        self.bad_images.poll()

    def _inputs(self, imgs, device):
        return self.data.prepare(imgs.to(device), None)[0]

    def at_boundary(self, loop: Loop, epoch_end: bool, last: bool):
        epochs_done = loop.epoch_number()
        if self.knn is not None and self.knn.due(epochs_done, epoch_end, last):
            t0 = time.time()
            result = self.knn(self.model.encoder, loop.device)
            result.update(step=loop.step, epoch=epochs_done, seconds=round(time.time() - t0, 2))
            self.knn_results.append(result)
            log.info("step %d kNN top-1 %.2f top-5 %.2f (%d bank, %d query images, %.1f s)", loop.step,
                     result["acc1"], result["acc5"], result["bank_images"], result["query_images"], result["seconds"])
            if loop.writer is not None:
                loop.writer.add_scalar("knn/top1", result["acc1"], loop.step)
                loop.writer.add_scalar("knn/top5", result["acc5"], loop.step)
        if not (last or (epoch_end and epochs_done % self.vis_every == 0)):
            return
        imgs = self._inputs(self.monitor_imgs, loop.device)
        collapse = collapse_stats(self.model.encoder, imgs)
        self.collapse = collapse_scalars(collapse)
        log.info("step %d %s", loop.step, collapse_summary(collapse))
        if loop.writer is not None:
            picture = reconstruction_grid(self.model, imgs[:4], self.vis_masks.to(loop.device), mean=self.data.mean,
                                          std=self.data.std, show_channels=self.show_channels)
            loop.writer.add_image("reconstruction", picture, loop.step)
            for tag, value in self.collapse.items():
                loop.writer.add_scalar(tag, value, loop.step)

    def state(self) -> dict:
        return {"collapse": self.collapse, "knn": self.knn_results}

    def load_state(self, state: dict):
        self.collapse, self.knn_results = dict(state.get("collapse", {})), list(state.get("knn", []))

    def metrics(self) -> dict:
        out = {}
        if self.collapse:
            out["collapse"] = self.collapse
        if self.knn_results:
            out["knn"] = self.knn_results
        return out
