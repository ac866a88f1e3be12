"""Train a small PWLU network with FSDP2 (``fully_shard``) and the two-phase realignment.

Run from the repository root; on CPU the ranks talk over gloo, on GPUs over nccl::

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py --epochs 2 --checkpoint fsdp2_ckpt
    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py --epochs 4 --checkpoint fsdp2_ckpt

The first command stops after 2 of the 3 warm-up epochs (phase I) and saves a
``torch.distributed.checkpoint`` (model, optimizer and realigner); the second resumes from it,
realigns at the end of epoch 3 and trains phase II. ``--compile`` compiles each block with
``torch.compile`` before sharding it.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pwlu

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--checkpoint", default=None, help="DCP folder: saved after every epoch, resumed from if present")
parser.add_argument("--compile", action="store_true", help="torch.compile each block before sharding it")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
rank = dist.get_rank()

torch.manual_seed(0)  # the same data and the same initial model on every rank
x_all = torch.randn(2048, 16)
y_all = (x_all @ torch.randn(16, 4)).abs().argmax(1)  # a target a small MLP can learn
data = TensorDataset(x_all, y_all)
sampler = DistributedSampler(data, seed=0)  # each rank: its share of every epoch
loader = DataLoader(data, batch_size=64, sampler=sampler, drop_last=True)

model = nn.Sequential(
    nn.Sequential(nn.Linear(16, 64), pwlu.PWLU(64, channel_dim=-1)),  # channel-wise over (B, C)
    nn.Sequential(nn.Linear(64, 64), pwlu.PWLU()),  # layer-wise: 0-d parameters
    nn.Linear(64, 4),
).to(device)
pwlu.prepare_fully_shard(model)  # the layer-wise PWLU's scalars become (1,): fully_shard needs a dim 0
for block in model[:2]:
    if args.compile:
        block.compile()  # compile, then shard: the PWLU op and its statistics sync are captured whole
    fully_shard(block)
fully_shard(model)  # every PWLU parameter is now a DTensor sharded on dim 0

optimizer = torch.optim.AdamW(pwlu.parameter_groups(model, weight_decay=1e-2), lr=3e-3)
realigner = pwlu.BoundaryRealigner.from_epochs(model, warmup_epochs=3, steps_per_epoch=len(loader))


def state() -> dict:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "realigner": realigner.state_dict()}


start = 0
if args.checkpoint and os.path.exists(os.path.join(args.checkpoint, ".metadata")):
    checkpoint = state()
    dcp.load(checkpoint, checkpoint_id=args.checkpoint)  # each rank reads its shards
    # strict=False: in phase I the frozen PWLU parameters have no optimizer state (by design)
    set_state_dict(model, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optim"],
                   options=StateDictOptions(strict=False))  # fmt: skip
    realigner.load_state_dict(checkpoint["realigner"])
    start = realigner.num_steps // len(loader)
    if rank == 0:
        print(f"resumed at epoch {start} (step {realigner.num_steps}, {realigner.phase})")

for epoch in range(start, args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        realigner.step()  # statistics merged across the ranks; realigns the shards at the warm-up's end
    if args.checkpoint:
        dcp.save(state(), storage_writer=dcp.FileSystemWriter(args.checkpoint, overwrite=True))  # each rank its shards
    if rank == 0:
        print(f"epoch {epoch}: loss {loss.item():.3f} ({realigner.phase})")

model.eval()
with torch.no_grad():
    accuracy = (model(x_all.to(device)).argmax(1).cpu() == y_all).float().mean().item()
ious = pwlu.boundary_iou(model, [x_all[i : i + 256].to(device) for i in range(0, 2048, 256)])  # every rank calls it
if rank == 0:
    print(f"accuracy {accuracy:.3f}; boundary IOU", {name: round(iou.mean().item(), 3) for name, iou in ious.items()})
dist.destroy_process_group()
