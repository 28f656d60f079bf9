"""Paths are local (or mounted) filesystem paths: a URL such as `gs://bucket/run` is refused.

Every reader and writer here goes through the local filesystem (pathlib, orbax on a local
directory, TFDS's array_record shards opened by path). A URL given where a path is expected
would be taken as a relative path (`gs:/bucket/run` under the current directory): a run would
write its checkpoints to the wrong machine's disk and look complete. Mount the bucket instead
(Cloud Storage FUSE: `gcsfuse BUCKET /mnt/BUCKET`; or a shared filesystem such as Filestore or
NFS) and pass the mounted path.
"""

from __future__ import annotations

import re

# a scheme as RFC 3986 spells it, then "://": gs://, s3://, hdfs://, file://, http://, ...
_URL = re.compile(r"(?:^|[:=])([A-Za-z][A-Za-z0-9+.-]*://)")

MOUNT_HINT = ("xdistill-jax reads and writes local paths only; mount the bucket (e.g. "
              "`gcsfuse BUCKET /mnt/BUCKET`, or a shared filesystem such as NFS) and give the mounted path")


def url_scheme(value) -> str | None:
    """The URL scheme in a path-like string (`gs://`), also after a `backend:` prefix; else None."""
    if not isinstance(value, str):
        return None
    m = _URL.search(value)
    return m.group(1) if m else None


def url_error(where: str, value: str) -> str:
    """The message for a URL given as `where` (a flag or a config key)."""
    return f"{where}={value}: a URL ({url_scheme(value)}), not a path; {MOUNT_HINT}"


def require_local(value, where: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming `where` if `value` (a str or os.PathLike) is a URL."""
    if url_scheme(str(value)):
        raise error(url_error(where, str(value)))


def find_url_arguments(args) -> list[tuple[str, str]]:
    """(flag, value) of each parsed command-line argument that holds a URL (lists included)."""
    found = []
    for dest, value in sorted(vars(args).items()):
        if dest.startswith("_") or dest == "extra_args":
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if url_scheme(v):
                found.append(("--" + dest.replace("_", "-") if dest != "inputs" else "INPUT", v))
    return found
