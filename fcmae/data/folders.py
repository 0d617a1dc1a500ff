"""Image folders for training: timm's folder listing (recursive, natural-sorted, class subfolders optional,
`class_to_idx` as in timm), extended to the formats PIL reads and NumPy arrays (IMAGE_EXTENSIONS, any case); each
file decoded by fcmae.data.decode, unreadable ones skipped and counted by fcmae.data.bad_samples.

The walk (`find_images`) lists what timm's find_images_and_targets lists, in the same order, except where that
would hang, explode or duplicate: a folder link is followed only to a folder outside the tree that is not an
ancestor of it and was not listed yet (a link back into the tree or up to an ancestor, a loop, is left out; a
second link to a folder already listed too), and only regular files are listed (a FIFO, socket or device named like
an image is left out; a dangling link stays, to be counted as unreadable when read). What is left out is counted
in one warning. Links to folders elsewhere (a data set assembled from links) are followed as before.
"""
import logging
import os
import stat
from typing import Dict, List, Optional, Tuple

import numpy as np
from timm.utils.misc import natural_key

from fcmae.runtime.errors import DataError

from .bad_samples import SkippingDataset
from .decode import IMAGE_EXTENSIONS, Decoded, describe, load
from .locations import COMPRESSED, compressed_message, printable

log = logging.getLogger("fcmae")


def _walk(top: str, inside: str, seen: set, skipped: Dict[str, list]):
    """(folder, [file entries]) bottom-up in os.walk's order (topdown=False), following folder links by the
    module's rule; `inside`: the tree's real path; `seen`: (device, inode) of the folders listed."""
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:  # unreadable folder: skipped, as os.walk does
        return
    folders, files = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        (folders if is_dir else files).append(entry)
    for entry in folders:
        st = entry.stat()
        if (st.st_dev, st.st_ino) in seen:  # a loop (an ancestor), a bind mount or a second link to one folder
            skipped["links"].append(entry.path)
            continue
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.commonpath([target, inside]) in (target, inside):  # into the tree, or up to an ancestor
                skipped["links"].append(entry.path)
                continue
        seen.add((st.st_dev, st.st_ino))
        yield from _walk(entry.path, inside, seen, skipped)
    yield top, files


def _regular(entry: os.DirEntry) -> bool:
    """A regular file, or a dangling link (which fails when read, as a bad file); not a FIFO, socket or device."""
    if entry.is_file(follow_symlinks=False):
        return True
    try:
        return stat.S_ISREG(entry.stat().st_mode)
    except OSError:
        return True


def find_images(folder: str, types=IMAGE_EXTENSIONS,
                class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """timm's find_images_and_targets (leaf folder names as classes, natural-sorted classes and files; files of
    classes not in a given `class_to_idx` left out) with the module's walk: links that would loop or duplicate
    and files that are not regular are left out, counted in one warning."""
    types = {t.lower() for t in types}
    skipped = {"links": [], "special": []}
    root = os.path.realpath(folder)
    st = os.stat(folder)
    labels, filenames = [], []
    for top, files in _walk(folder, root, {(st.st_dev, st.st_ino)}, skipped):
        rel = os.path.relpath(top, folder) if top != folder else ""
        label = os.path.basename(rel)
        for entry in files:
            if os.path.splitext(entry.name)[1].lower() in types:
                if _regular(entry):
                    filenames.append(entry.path)
                    labels.append(label)
                else:
                    skipped["special"].append(entry.path)
    if skipped["links"] or skipped["special"]:
        parts = []
        if skipped["links"]:
            first = skipped["links"][0]
            parts.append(f"{len(skipped['links'])} folder link{'s' * (len(skipped['links']) != 1)} back into the "
                         f"folder, up to an ancestor or to a folder already listed (first: {printable(first)} -> "
                         f"{printable(os.path.realpath(first))})")
        if skipped["special"]:
            parts.append(f"{len(skipped['special'])} file{'s' * (len(skipped['special']) != 1)} that are not "
                         f"regular files (a FIFO, socket or device; first: {printable(skipped['special'][0])})")
        log.warning("listing %s: left out %s", printable(folder), " and ".join(parts))
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(sorted(set(labels), key=natural_key))}
    samples = [(f, class_to_idx[lbl]) for f, lbl in zip(filenames, labels) if lbl in class_to_idx]
    return sorted(samples, key=lambda s: natural_key(s[0])), class_to_idx


def no_images_error(root: str) -> DataError:
    """"No images", or, for a folder of compressed tar shards, that those are not supported."""
    compressed = sorted(e.name for e in os.scandir(root) if e.name.lower().endswith(tuple(COMPRESSED)))
    if compressed:
        kind = COMPRESSED[next(ext for ext in COMPRESSED if compressed[0].lower().endswith(ext))]
        return DataError(compressed_message(os.path.join(root, compressed[0]), kind)
                         + f" ({len(compressed)} such file{'s' * (len(compressed) != 1)} in {root})")
    return DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")


class ImageFiles(SkippingDataset):
    """(decoded image, target) for each image file under `root`, `in_chans` channels each (see `decode`); bad files
    skipped as the module describes.

    `input_size` (the transform's output, int or (H, W)) lets big JPEGs decode at a reduced scale;
    `bad_image` and `max_bad_fraction` set when bad files stop the run. `kind` is EIGHT_BIT or HIGH_BIT_DEPTH, that
    of the first file (in listing order) that loads, `kind_file` (None when none of the first 100 does); files of
    the other kind are bad."""

    def __init__(self, root: str, transform=None, class_to_idx=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01, in_chans: int = 3):
        if not os.path.isdir(root):
            raise DataError(f"data folder not found: {root}")
        self.samples, self.class_to_idx = find_images(root, class_to_idx=class_to_idx or None)
        if not self.samples:
            raise no_images_error(root)
        self.root, self.where, self.transform, self.in_chans = root, root, transform, in_chans
        self.draft_side = 2 * int(max(np.atleast_1d(input_size))) if input_size is not None else None
        self.bad_image, self.max_bad_fraction = bad_image, max_bad_fraction
        self._count_bad()
        self.probe_kind()

    def keep_only(self, indices):
        """Restrict the dataset to these files (in this order), its bad-file count and limit with it."""
        self.samples = [self.samples[i] for i in indices]
        self._count_bad()

    def __len__(self):
        return len(self.samples)

    def filename(self, i: int) -> str:
        return self.samples[i][0]

    def target(self, i: int) -> int:
        return self.samples[i][1]

    def read_bytes(self, i: int) -> bytes:
        """File i's bytes, undecoded (--augment-on-device decodes JPEGs on the training device)."""
        with open(self.samples[i][0], "rb") as f:
            return f.read()

    def load(self, i: int) -> Decoded:
        """File i decoded (no transform); raises when it cannot be read."""
        return load(self.samples[i][0], self.in_chans, self.draft_side)

    def reason(self, error: Exception, i: int) -> str:
        return describe(error, self.filename(i))


def image_folder(root: str, transform=None, class_to_idx=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01, in_chans: int = 3):
    """A folder of images, with or without class subfolders (timm's reader), decoded to `in_chans` channels with
    unreadable files skipped and counted (this module). A missing folder or one without images is a DataError,
    raised here."""
    return ImageFiles(root, transform=transform, class_to_idx=class_to_idx, input_size=input_size,
                      bad_image=bad_image, max_bad_fraction=max_bad_fraction, in_chans=in_chans)
