"""Writing a ``.safetensors`` file (checkpoints, gene tables): room checked first, the same bytes every run."""

from __future__ import annotations

import json
import os

from vcell.data.io import check_space


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` after :func:`check_space`; a full disk met anyway is the
    ``OSError`` the command line prints as one line (safetensors raises its own error type)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    check_space(path, sum(t.numel() * t.element_size() for t in tensors.values()))
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        if "os error 28" in str(exc) or "No space left" in str(exc):
            raise OSError(28, "No space left on device", str(path)) from None
        raise
    _sort_header(path)


def _sort_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place: safetensors writes its
    metadata in hash order, so two identical runs gave files that differed (checksums, not values)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same entries: never longer (the padding keeps the data's offset)
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
