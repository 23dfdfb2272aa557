"""Run train.main() under torchrun and record, per process, which train windows it read, the
weights it ended with, and how many DDP wrappers were still alive when the process group was
destroyed (tests/test_train.py checks them). Usage: ddp_worker.py OUT_DIR ARGS..."""

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel

import train
from shards import ShardLoader

record_dir = Path(sys.argv[1])
window_ids = []
read_window_ids = ShardLoader.window_ids
destroy_process_group = torch.distributed.destroy_process_group
ddp_alive_at_destroy = []


def recording_window_ids(self):
    ids = read_window_ids(self)
    if self.shuffle:  # the train loader; the val loader reads in order
        window_ids.extend(int(i) for i in ids)
    return ids


def counting_destroy_process_group(group=None):
    # gc.get_objects() also lists garbage not collected yet: a wrapper in a reference cycle counts
    ddp_alive_at_destroy.append(sum(type(o) is DistributedDataParallel for o in gc.get_objects()))
    destroy_process_group(group)


ShardLoader.window_ids = recording_window_ids
torch.distributed.destroy_process_group = counting_destroy_process_group
model, _ = train.main(sys.argv[2:])
record_dir.mkdir(parents=True, exist_ok=True)
torch.save({"window_ids": window_ids, "weights": model.state_dict(), "ddp_alive_at_destroy": ddp_alive_at_destroy},
           record_dir / f"rank{os.environ['RANK']}.pt")
