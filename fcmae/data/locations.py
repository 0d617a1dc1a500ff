"""Which data locations are read, and the one-line answer for those that are not: URLs (http(s)://, s3://, gs://,
pipe:, ...) and compressed tar shards (.tar.gz, .tgz, .tar.zst, ...; also compressed data named .tar) are
refused with a message saying what is supported (local uncompressed tar shards or a local image folder); and
`printable`, for paths and member names that hold undecodable bytes.
"""
import re
from typing import Optional

URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://|pipe:")
COMPRESSED = {".tar.gz": "gzip", ".tgz": "gzip", ".tar.bz2": "bzip2", ".tbz2": "bzip2", ".tar.xz": "xz",
              ".txz": "xz", ".tar.zst": "zstd", ".tar.zstd": "zstd", ".tar.lz4": "lz4"}
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
         b"\x04\x22\x4d\x18": "lz4"}
SUPPORTED = ("local uncompressed tar shards (a pattern such as 'shards/train-{000000..000146}.tar', a .tar file or a "
             "folder of .tar files) or a local image folder")


def printable(text: str) -> str:
    """`text` (a path or member name, maybe holding undecodable bytes as surrogates) safe to print and log."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unsupported(data_path: str) -> Optional[str]:
    """Why --data-path names something not read here (a URL, compressed shards), else None."""
    url = URL.match(data_path)
    if url:
        what = f"{url.group(1)}:// URLs" if url.group(1) else "pipe: commands"
        return (f"{data_path}: {what} are not supported; give {SUPPORTED} (copy the shards to local disk, or mount "
                "the bucket with s3fs, gcsfuse or rclone mount)")
    compression = next((c for ext, c in COMPRESSED.items() if data_path.lower().endswith(ext)), None)
    if compression:
        return compressed_message(data_path, compression)
    return None


def compressed_message(path: str, compression: str) -> str:
    return (f"{path}: {compression}-compressed tar shards are not supported (a sample is read at its offset, which "
            f"needs an uncompressed tar); decompress them to .tar files, and give {SUPPORTED}")
