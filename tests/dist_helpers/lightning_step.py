"""One SER step under Lightning's DDP strategy (2 CPU processes); run by torchrun, rank 0 writes --out.

The LightningModule owns the ViT and the SER handle as attributes, so Lightning's DDP wrapper syncs the
token head too. The data set carries each image's two D4 elements, so the views do not depend on how
Lightning's DistributedSampler splits the batch (the SER loss is invariant to image order).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402

from dist_helpers.common import LAYER, make_images, make_vit  # noqa: E402
from ser_plugin import GroupElement, ViewPair, act_image, attach_ser  # noqa: E402

N = 8
LR = 0.5


def dataset() -> TensorDataset:
    x = make_images(N, seed=30)
    g = torch.Generator().manual_seed(31)
    rot = torch.randint(0, 4, (N, 2), generator=g)
    flip = torch.randint(0, 2, (N, 2), generator=g)
    return TensorDataset(x, rot, flip)


def batch_to_pair(batch) -> ViewPair:
    x, rot, flip = batch
    g1, g2 = GroupElement.from_d4(rot[:, 0], flip[:, 0]), GroupElement.from_d4(rot[:, 1], flip[:, 1])
    return ViewPair(act_image(x, g1), act_image(x, g2), g1, g2)


class SERModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.vit = make_vit(0)
        torch.manual_seed(1)
        self.ser = attach_ser(self.vit, LAYER, head=True, head_dims=(16, 16), photometric=None)
        self.losses = []

    def training_step(self, batch, batch_idx):
        pair = batch_to_pair(batch)
        with self.ser.capture():
            o1, o2 = self.vit(pair.x1), self.vit(pair.x2)
        host = (o1 - o2).pow(2).mean()
        ser_loss = self.ser.loss(pair)
        self.losses.append((host.detach(), ser_loss.detach()))
        return host + ser_loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    module = SERModule()
    loader = DataLoader(dataset(), batch_size=N // 2, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    host, ser_loss = module.losses[0]
    ws = trainer.world_size
    t = torch.stack([host, ser_loss])
    torch.distributed.all_reduce(t)
    if trainer.global_rank == 0:
        torch.save(
            {"world": ws, "host": t[0] / ws, "ser": t[1] / ws, "params": {n: p.detach().clone() for n, p in module.named_parameters()}},
            args.out,
        )
    # tear the process group down before the interpreter exits, as ddp_step.py does: left alive, gloo's threads
    # were seen to abort the process at exit ("terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
