"""One SER step under Lightning's DDP strategy (2 CPU processes); run by torchrun.

Default mode (tests/test_distributed.py): the LightningModule owns the ViT and the SER handle as attributes,
so Lightning's DDP wrapper syncs the token head too; rank 0 writes ``--out``. The data set carries each
image's two D4 elements, so the views do not depend on how Lightning's DistributedSampler splits the batch
(the SER loss is invariant to image order).

``--callback`` mode (tests/test_lightning.py): a plain module plus :class:`SERCallback` (extra-pass mode,
token head). Each rank writes ``--out/rank<r>.pt`` with its batch, its views (images and group elements),
its losses, the initial weights and the weights after the step; :func:`callback_reference` recomputes the
step in one process on the union of the ranks' batches.
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
from ser_plugin import GroupElement, SERConfig, ViewPair, act_image, attach_ser  # noqa: E402

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


#: SER options of the callback run (views: random D4 per sample; no photometrics so the step is exact)
CB_CONFIG = SERConfig(layer=LAYER, head=True, head_dims=(16, 16), photometric=None, b2_share=0.5)


class CallbackModule(L.LightningModule):
    """No SER inside: the callback adds it. Host loss: mean squared output of the ViT on the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = make_vit(0)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.vit(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)  # self.parameters() holds SER's state while fitting


def run_callback(out: str) -> None:
    from ser_plugin.integrations.lightning import SERCallback

    record: dict = {}

    class Record(SERCallback):
        def _views(self, batch, device):
            pair = super()._views(batch, device)
            record["pair"] = pair
            return pair

    class Snap(L.Callback):
        def on_train_start(self, trainer, pl_module):
            record["init"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record["batch"] = batch[0].detach().clone()

        def on_train_end(self, trainer, pl_module):
            record["params"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    cb = Record(config=CB_CONFIG, backbone="vit", images=lambda b: b[0])
    module = CallbackModule()
    loader = DataLoader(TensorDataset(make_images(N, seed=40)), batch_size=N // 2, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb, Snap()],
    )
    trainer.fit(module, loader)
    torch.save(
        {
            "world": trainer.world_size, "batch": record["batch"], "pair": record["pair"], "init": record["init"],
            "params": record["params"], "host": cb.last_host_loss, "ser": cb.last_term.detach(),
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def callback_reference(ranks: list) -> dict:
    """The callback's DDP step recomputed in one process: the ranks' host losses averaged, SER on the union of
    their views, one SGD step from rank 0's initial weights (DDP broadcasts them)."""
    from ser_plugin.integrations.lightning import SERModuleState

    module = CallbackModule()
    ser = attach_ser(module.vit, config=CB_CONFIG)
    module.add_module("ser_state", SERModuleState(ser.objective))
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(ranks[0]["init"][n])
    host = sum(module.vit(r["batch"]).pow(2).mean() for r in ranks) / len(ranks)
    pairs = [r["pair"] for r in ranks]
    pair = ViewPair(torch.cat([q.x1 for q in pairs]), torch.cat([q.x2 for q in pairs]),
                    GroupElement.cat([q.g1 for q in pairs]), GroupElement.cat([q.g2 for q in pairs]))
    ser_loss = ser.forward_loss(pair)
    (host + ser_loss).backward()
    torch.optim.SGD(module.parameters(), lr=LR).step()
    return {"host": host.detach(), "ser": ser_loss.detach(), "params": {n: p.detach().clone() for n, p in module.named_parameters()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--callback", action="store_true", help="SERCallback mode: --out is a folder, every rank writes rank<r>.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.callback:
        run_callback(args.out)
        return
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
