"""Suite-wide settings: no test ever reaches a model hub (the machines here have no network to one)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
