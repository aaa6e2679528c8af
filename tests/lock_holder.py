"""A second real process holding a folder's vpeft lock: ``python lock_holder.py FOLDER COMMAND SECONDS``.

Prints ``held`` once it holds the lock, sleeps, then releases it by exiting (tests kill it or let it finish).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vpeft.files import folder_lock  # noqa: E402

if __name__ == "__main__":
    folder, command, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with folder_lock(folder, command):
        print("held", flush=True)
        time.sleep(seconds)
