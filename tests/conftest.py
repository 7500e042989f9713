"""Test-wide settings: keep caches inside the project and CPU threads low (2-core CI)."""

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PALSGD_HF_CACHE", str(ROOT / ".cache" / "palsgd_hf"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
torch.set_num_threads(1)
