"""Build a ComfyUI-style models folder for the model shipped in the package (links, no copies):

    python examples/make_models_folder.py models
    sd35fp8 run examples/workflows/shipped_api.json --models models
    sd35fp8 serve --models models

models/checkpoints/sd35fp8_tiny.safetensors        the all-in-one checkpoint (MMDiT, VAE, CLIP-L/G, T5)
models/checkpoints/spiece.model                    its T5 SentencePiece vocabulary, found beside it
models/diffusion_models/sd35fp8_tiny_mmdit_fp8_scaled.safetensors   the MMDiT as ComfyUI scaled fp8
Files are symbolic links to the package's files (copies where the file system has no links).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_T5_TOKENIZER

LAYOUT = {
    "checkpoints/sd35fp8_tiny.safetensors": SHIPPED_CHECKPOINT,
    "checkpoints/spiece.model": SHIPPED_T5_TOKENIZER,
    "diffusion_models/sd35fp8_tiny_mmdit_fp8_scaled.safetensors":
        SHIPPED_CHECKPOINT.with_name("sd35fp8_tiny_mmdit_fp8_scaled.safetensors"),
}


def build(root: Path) -> Path:
    for rel, source in LAYOUT.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        try:
            target.symlink_to(source.resolve())
        except OSError:  # no symbolic links here (e.g. Windows without the privilege)
            shutil.copy(source, target)
    return root


if __name__ == "__main__":
    folder = build(Path(sys.argv[1] if len(sys.argv) > 1 else "models"))
    print(folder)
