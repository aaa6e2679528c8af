"""Suite-wide settings: no test ever reaches a model hub (the machines here have no network to one)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import errno  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def refuse_write_probe():
    """``refuse(mp, folder)``: vpeft's write probe (``tempfile.TemporaryFile``) fails with EACCES under ``folder``,
    patched through ``mp`` (a ``monkeypatch`` or one of its contexts). How tests make a folder unwritable as root,
    which CI runs as."""

    def refuse(mp, folder: Path) -> None:
        real = tempfile.TemporaryFile

        def fake(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).absolute().is_relative_to(folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real(*args, dir=dir, **kwargs)

        mp.setattr(tempfile, "TemporaryFile", fake)

    return refuse
