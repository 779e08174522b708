"""DDP training on Gloo that saves checkpoints and resumes from them.

    torchrun --standalone --nproc-per-node 2 examples/ddp_checkpoint.py --dir /tmp/ckpt --steps 20
    torchrun --standalone --nproc-per-node 2 examples/ddp_checkpoint.py --dir /tmp/ckpt --steps 40
    python examples/ddp_checkpoint.py --dir /tmp/ckpt-1 --steps 20   # one process, Null backend
    torchrun --standalone --nproc-per-node 2 examples/ddp_checkpoint.py --dir /tmp/ckpt-2 \
        --trace /tmp/ckpt-2/trace.json && python -m syncdeco summary /tmp/ckpt-2/trace.json

The first command trains a tiny model from scratch for 20 steps and saves a
checkpoint every 10 (``--save-every``); the second finds that checkpoint,
resumes at step 20 and trains on to step 40.  With one process there is no
DDP wrapper and no process group; the sync points cost nothing.

- ``train_step`` is ``@sd.barrier_after(every=SYNC_EVERY)``: every rank
  trains, and all ranks meet on every SYNC_EVERY-th call, so a rank that
  crashes or hangs is reported by the others within a few steps.
- ``save_checkpoint`` is ``@sd.barrier_after`` over ``@sd.on_main_only``: the
  main rank writes the file with ``sd.atomic_save`` (a crash mid-save leaves
  the previous checkpoint intact) and every rank waits until it is written.
- ``load_checkpoint`` is ``@sd.main_first``: the main rank reads the
  checkpoint first (this is where it would fetch it from remote storage or
  convert an old format), then the others read the same file.

With ``--trace PATH`` the job runs inside ``sd.trace(PATH)``: every sync
point of every rank lands in one Chrome trace (open it in
https://ui.perfetto.dev), which ``python -m syncdeco summary PATH`` and
``python -m syncdeco plot PATH -o timeline.png`` read.

Each rank's batches depend only on the step and the rank, and the optimizer
state is saved too, so 20 steps, a checkpoint and 20 more give bit for bit
the model of 40 steps in one go.  Every rank prints a hash of its parameters;
under DDP they are the same on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import syncdeco as sd

SYNC_EVERY = 5  # train_step's ranks meet on every 5th call
BATCH = 32
FEATURES = 8


def say(message: str) -> None:
    # One write per line (newline included), so that lines from different
    # ranks do not interleave, even with PYTHONUNBUFFERED set.
    print(f"[rank {sd.rank()}/{sd.world_size()}] {message}\n", end="", flush=True)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))


def batch_for(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic regression data: a fixed function of (step, rank)."""
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(BATCH, FEATURES, generator=gen)
    weights = torch.linspace(-1.0, 1.0, FEATURES)
    y = torch.sin(x @ weights).unsqueeze(1) + 0.05 * torch.randn(BATCH, 1, generator=gen)
    return x, y


def params_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(bytes(param.detach().cpu().contiguous().view(torch.uint8).flatten().tolist()))
    return digest.hexdigest()[:16]


@sd.barrier_after(every=SYNC_EVERY)
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    x, y = batch_for(step, sd.rank())
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    # Under DDP, backward() also averages the gradients over the ranks.
    loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch's stubs
    optimizer.step()
    return loss.item()


@sd.barrier_after
@sd.on_main_only
def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> Path:
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    saved = sd.atomic_save(state, path)
    say(f"saved checkpoint at step {step}")
    return saved


@sd.main_first
def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def train(args: argparse.Namespace) -> None:
    """The whole job; every rank runs it."""
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "checkpoint.pt"
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    start = 0
    checkpoint = load_checkpoint(path)
    if checkpoint is None:
        say(f"no checkpoint in {args.dir}: starting at step 0")
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = int(checkpoint["step"])
        say(f"resumed from step {start}, params {params_hash(model)}")

    # Wrap after loading: DDP broadcasts rank 0's parameters to the others.
    ddp: nn.Module = DistributedDataParallel(model) if dist.is_initialized() else model
    for step in range(start + 1, args.steps + 1):
        loss = train_step(ddp, optimizer, step)
        if step % args.save_every == 0 or step == args.steps:
            if sd.is_main():
                say(f"step {step}: loss {loss:.4f}")
            save_checkpoint(path, model, optimizer, step)
    say(f"finished at step {max(start, args.steps)}, params {params_hash(model)}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "syncdeco-ddp-checkpoint",
        help="checkpoint directory (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=20, help="train up to this step")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--trace", type=Path, help="record the sync points into this Chrome trace")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if sd.world_size() > 1:  # launched by torchrun: DDP needs the process group now
        dist.init_process_group("gloo")
    try:
        with sd.trace(args.trace) if args.trace else contextlib.nullcontext():
            train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
