"""Run train.main() under torchrun and record, per process, which train windows it read and the
weights it ended with (tests/test_train.py compares them). Usage: ddp_worker.py OUT_DIR ARGS..."""

import os
import sys
from pathlib import Path

import torch

import train
from shards import ShardLoader

record_dir = Path(sys.argv[1])
window_ids = []
read_window_ids = ShardLoader.window_ids


def recording_window_ids(self):
    ids = read_window_ids(self)
    if self.shuffle:  # the train loader; the val loader reads in order
        window_ids.extend(int(i) for i in ids)
    return ids


ShardLoader.window_ids = recording_window_ids
model, _ = train.main(sys.argv[2:])
record_dir.mkdir(parents=True, exist_ok=True)
torch.save({"window_ids": window_ids, "weights": model.state_dict()}, record_dir / f"rank{os.environ['RANK']}.pt")
