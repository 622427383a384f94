"""Exit codes and error wording shared by the CLI and the sidecar's own process.

Free of click, so the long-running sidecar (``trustmesh.up.sidecar_process``) reports its
failures exactly as the CLI does without loading it.
"""

from __future__ import annotations

# Exit codes shared by every command (``trustmesh rotate`` documents its own on top of these).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def os_error(e: OSError) -> str:
    """``FILE: reason`` (``[Errno 2] No such file or directory: 'FILE'`` as Python words it)."""
    if e.strerror is None:
        return str(e)
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {e.strerror}" if names else e.strerror
