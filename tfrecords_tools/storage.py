"""Storage stage: where data may live (local, gs://, s3://, hdfs://) and the file systems those need.

Every reader and writer in the package goes through `tf.io.gfile`, so a path
is a local path or a URL whose scheme TensorFlow has a file system for.
TensorFlow itself brings `gs://`; `s3://` and `hdfs://` come from
tensorflow-io's plugin, whose last release (0.37.1) only loads next to
TensorFlow 2.16-2.17. `check_path` turns "the scheme is missing" from a late,
cryptic `UnimplementedError` deep inside tf.data into an immediate error
that says exactly what is missing and why.
"""

from __future__ import annotations

import functools
import posixpath
from typing import Optional

from tfrecords_tools.errors import BadInput

# Schemes TensorFlow's own wheel serves (gs:// through its built-in GCS file system).
BUILTIN_SCHEMES = ("gs", "file", "ram")
# Schemes that tensorflow-io's file-system plugin registers when `tensorflow_io` is imported.
PLUGIN_SCHEMES = ("s3", "hdfs", "viewfs", "har", "az", "http", "https")
PLUGIN_PACKAGE = "tensorflow-io==0.37.1"
PLUGIN_TF_RANGE = ">=2.16,<2.18"


# Set once a tensorflow-io file system has been loaded for a path in this process (see `exit_process`).
_PLUGIN_IN_USE = []


class StorageError(BadInput, ValueError):
    """A path whose file system is not available in this process (the message says why)."""


def scheme(path: str) -> str:
    """'s3' for 's3://bucket/x', '' for a local path."""
    head, sep, _ = str(path).partition("://")
    return head.lower() if sep else ""


def is_remote(path: str) -> bool:
    return scheme(path) not in ("", "file")


def join(root: str, *names: str) -> str:
    """Joins paths the way gfile expects: posix separators for URLs, the OS's own for local paths."""
    import os
    return posixpath.join(root, *names) if "://" in str(root) else os.path.join(root, *names)


@functools.lru_cache(maxsize=None)
def _load_plugin() -> Optional[str]:
    """Imports tensorflow-io (which registers its file systems); returns why it could not, or None."""
    import tensorflow as tf
    try:
        import tensorflow_io  # noqa: F401  the import registers s3://, hdfs://, az:// ...
    except ImportError as e:
        return f"tensorflow-io is not installed ({e})"
    except Exception as e:  # noqa: BLE001  a plugin built for another TF fails in many ways (NotFoundError, OSError)
        return (f"tensorflow-io is installed but its file-system plugin does not load next to "
                f"TensorFlow {tf.__version__}: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
    return None


def _registered(name: str) -> bool:
    import tensorflow as tf
    return name in tf.io.gfile.get_registered_schemes()


def check_path(path: str) -> str:
    """Returns `path` when this process can read and write it; raises `StorageError` saying why not.

    No I/O: only the registered file systems are looked at. For tensorflow-io's
    schemes the plugin is loaded here, once per process.
    """
    name = scheme(path)
    if name in ("",) + BUILTIN_SCHEMES:
        return path
    import tensorflow as tf

    why = _load_plugin() if name in PLUGIN_SCHEMES else None
    if _registered(name):
        if name in PLUGIN_SCHEMES and not _PLUGIN_IN_USE:
            _PLUGIN_IN_USE.append(name)
        return path
    if name in PLUGIN_SCHEMES:
        raise StorageError(
            f"{path}: TensorFlow {tf.__version__} has no file system for {name}://. {name}:// paths come from "
            f"tensorflow-io's plugin; its last release ({PLUGIN_PACKAGE}) loads only with tensorflow{PLUGIN_TF_RANGE} "
            f"(pip install 'stpkeras[io]' in an environment with that TensorFlow; see the README's 'Remote "
            f"storage'). Here: {why or 'the plugin loaded but registered no ' + name + ':// file system'}.")
    raise StorageError(f"{path}: TensorFlow {tf.__version__} has no file system for {name}://. "
                       f"Supported here: local paths, {', '.join(s + '://' for s in BUILTIN_SCHEMES)} and, with "
                       f"{PLUGIN_PACKAGE}, {', '.join(s + '://' for s in PLUGIN_SCHEMES)}.")


def exit_process(code: int) -> None:
    """Ends the process with `code`; after tensorflow-io's S3 file system was used, skips C++ static destructors.

    With tensorflow-io 0.37.1 (TF 2.16 and 2.17 alike), a process that made
    any s3:// call aborts at exit with "pure virtual method called" (SIGABRT,
    exit code 134), after all its work is done: the AWS SDK inside the plugin
    is never shut down (`Aws::ShutdownAPI`), and its static EC2-metadata client
    is destroyed during `exit()` after the curl handle container it still
    points to (gdb: `__run_exit_handlers` -> `~EC2MetadataClient` ->
    `~CurlHttpClient` -> `~CurlHandleContainer` -> `__cxa_pure_virtual`). It
    happens against any endpoint (seen here against a local S3 server), for
    reads as well as writes, and no environment setting avoids it. Files were
    closed (uploaded) before that point, so the work is intact but the exit
    code lies. Here Python's atexit handlers run and its buffers are flushed
    by hand; `os._exit` then skips only the C++ destructors that crash. Call it
    last, from the outermost frame (as the `stp` entry point does).
    """
    import atexit
    import os
    import sys

    if not _PLUGIN_IN_USE:
        sys.exit(code)
    atexit._run_exitfuncs()  # what interpreter shutdown would run (TensorBoard writers, logging)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
