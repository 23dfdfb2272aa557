"""Write a clean, complete Hugging Face GPT-2 directory from any checkpoint: the one command to
publish a run (then `hf upload` the directory).

    python export.py --checkpoint out/small --out exported/small
    python export.py --checkpoint out/lora/ckpt/step_0000500 --out exported/lora --overwrite

--checkpoint is what sample.py takes (a run's out_dir: its newest loadable checkpoint; one
checkpoint; a GPT-2 directory), loaded by checkpoints.load_latest, so a LoRA run's adapter is
merged into its base. --out gets config.json, model.safetensors, GPT-2's tokenizer files,
generation_config.json and a model card (hf_dir.save_pretrained), and no optimizer, RNG or
training state. The weights are checked finite first; the directory is built as a temporary
sibling and renamed into place once every file is on disk (atomic.publish_dir).

An existing --out is refused unless it is empty; with --overwrite it is replaced only when it
holds nothing but the files an export writes (nothing of anyone else's is deleted). A symlinked
--out is always refused: the rename would replace the link, not what it points to.
A problem with the input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import atomic
import checkpoints
from errors import CheckpointError, OptionError, exit_status
from hf_dir import CONFIG_FILE, WEIGHT_FILES, config_to_hf, extra_files

TMP_PREFIX = ".tmp_export_"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a checkpoint as a Hugging Face GPT-2 directory.")
    p.add_argument("--checkpoint", required=True,
                   help="a training out_dir (its newest loadable checkpoint), a checkpoint directory (a LoRA "
                        "run's: the adapter is merged into its base) or a Hugging Face GPT-2 directory")
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out that holds only an earlier export's files")
    return p.parse_args(argv)


def export_files(model) -> set[str]:
    """The names of the files an export of `model` writes."""
    hf_config = config_to_hf(model.config)
    return {CONFIG_FILE, WEIGHT_FILES[0], *extra_files(hf_config, 1)}


def check_out(out: Path, ours: set[str], overwrite: bool) -> None:
    """Refuse an --out that is a symlink, a file, or a non-empty directory (with overwrite: one
    holding anything but `ours`, plain files). Raises OptionError naming it."""
    if out.is_symlink():
        raise OptionError(f"--out {out} is a symlink (to {out.readlink()}); give the real directory")
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file, not a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return
    if not overwrite:
        raise OptionError(f"--out {out} is not empty ({', '.join(held[:4])}{' ...' if len(held) > 4 else ''}); "
                          f"pass --overwrite to replace an earlier export, or choose another directory")
    foreign = [name for name in held if name not in ours or (out / name).is_symlink() or not (out / name).is_file()]
    if foreign:
        raise OptionError(f"--out {out} holds files an export does not write ({', '.join(foreign[:4])}); "
                          f"--overwrite replaces only an earlier export: move them away or choose another directory")


def training_facts(directory: Path, meta: dict) -> dict | None:
    """The model card's training facts of a checkpoint (meta.json's state and train_config.json)."""
    if not meta:
        return None
    facts = {k: v for k, v in meta.items() if k not in ("files", "sha256")}
    try:
        facts["train_config"] = json.loads((directory / checkpoints.TRAIN_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        pass  # a checkpoint saved outside train.py has no run config; the card says less
    return facts


def export(checkpoint: str | Path, out: str | Path, overwrite: bool = False, warn=print) -> Path:
    """Write the model `checkpoint` stands for to `out` (see the module docstring); returns the
    checkpoint directory it came from. Raises CheckpointError for the checkpoint or non-finite
    weights, OptionError for --out."""
    out = Path(out)
    directory, meta, model = checkpoints.load_latest(checkpoint, checkpoints.load_model, need_state=False, warn=warn)
    check_out(out, export_files(model), overwrite)
    bad = [name for name, tensor in model.state_dict().items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{directory} has non-finite weights ({', '.join(bad[:3])}); nothing was exported")
    tmp = out.with_name(TMP_PREFIX + out.name)
    with atomic.building_dir(out, tmp):
        model.save_pretrained(tmp, training=training_facts(directory, meta))
    atomic.publish_dir(tmp, out)
    return directory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        directory = export(args.checkpoint, args.out, args.overwrite, warn=lambda m: print(m, file=sys.stderr))
        print(f"exported {directory} to {args.out}", file=sys.stderr)

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
