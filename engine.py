"""The training engine that train.py, val.py and bench.py share.

Engine holds what changes while a run trains - network, optimizer, schedule, AMP scaler, loss,
and the progress (epoch, best score, log rows) - built once from the config and a Runtime, with
state_dict()/load_state_dict() for last.pth. Its train_one_epoch() and validate() are the loop
bodies; forward_loss() and predict_logits() are the forward pass (with the deep-supervision
heads) that val.py and bench.py use too.
"""
import math

import torch
from torch.profiler import record_function
from tqdm import tqdm

import checkpoint
import distributed
from archs import build_model, final_logits
from losses import LOSSES
from metrics import SegMeter, binarize
from utils import UserError, progress_bar, seed_everything

SYNC_EVERY = 10  # batches between host syncs (progress bar, NaN check): syncing each batch stalls a GPU


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""
    exit_code = 3


def build_optimizer(cfg, params, fused):
    """The optimizer; `fused`: the single-kernel implementations where torch has them (CUDA)."""
    name, lr, wd, fused = cfg["optimizer"], cfg["lr"], cfg["weight_decay"], fused or None
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=wd,
                               fused=fused)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused)
    return torch.optim.RMSprop(params, lr=lr, momentum=cfg["momentum"], weight_decay=wd)


def build_scheduler(cfg, optimizer):
    """Stepped once per epoch (ReduceLROnPlateau on the validation loss)."""
    name = cfg["scheduler"]
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"], eta_min=cfg["min_lr"])
    if name == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg["factor"], patience=cfg["patience"],
                                                          min_lr=cfg["min_lr"])
    if name == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg["milestones"], gamma=cfg["gamma"])
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def forward_loss(net, images, masks, criterion, deep_supervision):
    """-> (loss, logits of the final head). Deep supervision averages the loss over the 4 heads."""
    outputs = net(images)
    if deep_supervision:
        loss = sum(criterion(o, masks) for o in outputs) / len(outputs)
        return loss, outputs[-1]
    return criterion(outputs, masks), outputs


def predict_logits(net, images, deep_supervision):
    """Logits (B, C, H, W) of the final head: the one that predictions are made from."""
    return final_logits(net(images), deep_supervision)


def build_network(cfg, rt):
    """The config's network, placed on the Runtime's device in its memory format."""
    return rt.place_model(build_model(cfg))


def check_finite(batch_losses, sizes, epoch):
    """Mean loss so far (weighted by batch size); raises TrainingDiverged naming the first bad batch."""
    values = torch.stack(batch_losses).float().tolist()
    for i, v in enumerate(values, 1):
        if not math.isfinite(v):
            raise TrainingDiverged(f"the loss became {v} at epoch {epoch}, batch {i}; training stopped. "
                                   "The checkpoints on disk are from the last good epoch. Lower --lr "
                                   "(or try --amp off), then rerun with --overwrite or --resume.")
    return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)


def reduce_totals(meter, loss_sum, count, rt):
    """Sums the metric counts, loss and image count over all processes (in place in meter); -> mean loss."""
    totals = torch.tensor([float(loss_sum), float(count)], dtype=torch.float64, device=meter.sums.device)
    distributed.all_reduce_sum(meter.sums, rt)
    distributed.all_reduce_sum(totals, rt)
    return (totals[0] / totals[1]).item()


def warming_ema(decay):
    """The --ema update, its decay ramped up as min(decay, (1 + n) / (10 + n)) after n steps (TensorFlow's
    num_updates rule), so that the first steps' near-random weights do not linger in the average: with a fixed
    0.99, 27% of the initial weights were still in it after 130 steps, and it predicted foreground everywhere."""
    @torch.no_grad()
    def update(averaged, current, steps):
        d = min(decay, (1 + int(steps)) / (10 + int(steps)))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:                                                  # BatchNorm's batch counters
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * d + c * (1 - d))
    return update


class Engine:
    """One run's network, optimizer, scheduler, AMP scaler, loss and progress, built once.

    model: the network whose weights are saved; net: what runs the steps (DDP-wrapped under
    torchrun, torch.compiled with --compile). The progress - epoch done, best score (iou, epoch,
    stale epochs for early stopping) and the log rows - travels with it in last.pth.
    """

    def __init__(self, cfg, rt):
        self.cfg, self.rt = cfg, rt
        seed_everything(cfg["seed"])   # the same initial weights in every process
        if cfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = not cfg["deterministic"]
        model = build_model(cfg)
        if rt.active and cfg["sync_bn"]:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = rt.place_model(model)
        net = distributed.wrap(self.model, rt)
        self.net = torch.compile(net) if cfg["compile"] else net
        self.optimizer = build_optimizer(cfg, self.model.parameters(), rt.fused)
        # --ema: an exponential moving average of the weights (and BatchNorm statistics) after every step; it is
        # what is validated and saved as model.pth, and smooths out the epoch-to-epoch swings of the raw weights
        self.ema = (torch.optim.swa_utils.AveragedModel(self.model, multi_avg_fn=warming_ema(cfg["ema"]),
                                                        use_buffers=True) if cfg["ema"] else None)
        # the scaler is a no-op unless fp16 autocast, whose small gradients would underflow without it
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
        self.criterion = LOSSES[cfg["loss"]]()
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.epoch, self.rows = 0, []
        self.best = {"iou": -1.0, "epoch": 0, "stale": 0}

    @property
    def eval_net(self):
        """What validation runs and model.pth holds: the weight average with --ema, else the network itself."""
        return self.ema.module if self.ema is not None else self.net

    @property
    def lr(self):
        """The learning rate in force now."""
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, images, masks):
        """Forward, backward and optimizer step on one batch already on the device -> (loss, final logits).

        The record_function labels name the phases in `bench.py --profile` (microseconds a step when no profiler runs)."""
        with record_function("forward"), self.rt.autocast():
            loss, logits = forward_loss(self.net, images, masks, self.criterion, self.cfg["deep_supervision"])
        with record_function("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()    # under DDP this also all-reduces the gradients
        with record_function("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ema is not None:
            with record_function("ema"):
                self.ema.update_parameters(self.model)
        return loss.detach(), logits.detach()

    def train_one_epoch(self, loader, epoch):
        """One pass over the training split -> {'loss', 'iou'} (data-set-level IoU of the batches seen)."""
        self.net.train()
        meter = SegMeter(self.cfg["num_classes"], self.rt.device)
        batch_losses, sizes = [], []   # kept on the device; read every SYNC_EVERY batches
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg['epochs']}", leave=False, dynamic_ncols=True,
                   disable=None if self.rt.main else True)   # no bar in logs, nor on other processes than the first
        for step, (images, masks, _) in enumerate(bar, 1):
            with record_function("place"):
                images, masks = self.rt.place_batch(images, masks)   # (B, C_in, H, W), (B, C, H, W)
            loss, logits = self.train_step(images, masks)
            batch_losses.append(loss)
            sizes.append(images.shape[0])
            with record_function("metrics"):
                meter.update(binarize(logits, self.cfg["class_mode"]), masks)
            if step % SYNC_EVERY == 0 or step == len(loader):
                with record_function("sync"):
                    mean_loss = check_finite(batch_losses, sizes, epoch)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", iou=f"{meter.iou():.4f}")
        loss_sum = check_finite(batch_losses, sizes, epoch) * sum(sizes)
        mean_loss = reduce_totals(meter, loss_sum, sum(sizes), self.rt)   # over all processes: then the IoU
        return {"loss": mean_loss, "iou": meter.iou()}

    @torch.no_grad()
    def validate(self, loader):
        """Loss and data-set-level IoU/Dice (mean over classes) on the validation split (all processes' shards)."""
        net = self.eval_net
        net.eval()
        meter = SegMeter(self.cfg["num_classes"], self.rt.device)
        total_loss, count = torch.zeros((), device=self.rt.device), 0
        for images, masks, _ in progress_bar(loader, "validation", show=self.rt.main):
            images, masks = self.rt.place_batch(images, masks)
            with self.rt.autocast():
                loss, logits = forward_loss(net, images, masks, self.criterion, self.cfg["deep_supervision"])
            total_loss += loss.float() * images.shape[0]
            count += images.shape[0]
            meter.update(binarize(logits.float(), self.cfg["class_mode"]), masks)
        val_loss = reduce_totals(meter, total_loss.item(), count, self.rt)
        iou, dice = meter.dataset_scores()
        stats = {"val_loss": val_loss, "val_iou": iou.mean().item(), "val_dice": dice.mean().item()}
        if len(iou) > 1:                        # several classes: each one's IoU too (log.csv val_iou_<c>)
            stats.update({f"val_iou_{c}": v for c, v in enumerate(iou.tolist())})
        return stats

    def step_scheduler(self, val_loss):
        """Once per epoch; ReduceLROnPlateau decides on the validation loss."""
        if self.cfg["scheduler"] == "ReduceLROnPlateau":
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()

    def end_epoch(self, epoch, lr, stats, seconds):
        """Records a finished epoch (lr: the rate it trained with) as a log row; -> whether it is the best so far."""
        improved = stats["val_iou"] > self.best["iou"]
        if improved:
            self.best = {"iou": stats["val_iou"], "epoch": epoch, "stale": 0}
        else:
            self.best = {**self.best, "stale": self.best["stale"] + 1}
        self.epoch = epoch
        self.rows.append({"epoch": epoch, "lr": float(f"{lr:.6g}"), **{k: round(v, 6) for k, v in stats.items()},
                          "seconds": round(seconds, 3)})
        return improved

    def should_stop(self):
        """Early stopping: no better val_iou for cfg['early_stopping'] epochs (-1: never)."""
        return 0 < self.cfg["early_stopping"] <= self.best["stale"]

    def state_dict(self):
        """Everything a resumed run needs: the objects' states, the progress, RNG states and the config."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
                "best_iou": self.best["iou"], "best_epoch": self.best["epoch"], "stale_epochs": self.best["stale"],
                "log": self.rows, "rng": checkpoint.rng_state(), "config": self.cfg,
                "ema": None if self.ema is None else self.ema.module.state_dict(),
                "ema_steps": 0 if self.ema is None else int(self.ema.n_averaged)}

    def snapshot(self):
        """state_dict() with its tensors copied (milliseconds): saved in the background while training goes on."""
        return checkpoint.detached_copy(self.state_dict())

    def stretch_schedule(self):
        """--epochs changed on resume: the cosine is redrawn to end at the new last epoch, from where it stands
        (the lr in force becomes the closed-form value for the epochs done; a finished run starts climbing back)."""
        if not hasattr(self.scheduler, "T_max") or self.scheduler.T_max == self.cfg["epochs"]:
            return
        self.scheduler.T_max = self.cfg["epochs"]
        done, base, floor = self.scheduler.last_epoch, self.scheduler.base_lrs, self.scheduler.eta_min
        for group, base_lr in zip(self.optimizer.param_groups, base):
            group["lr"] = floor + (base_lr - floor) * (1 + math.cos(math.pi * done / self.cfg["epochs"])) / 2
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def load_state_dict(self, state, path="last.pth"):
        """Restores a state_dict() (from last.pth at `path`, named in errors)."""
        checkpoint.load_weights(self.model, state["model"], path)
        if self.ema is not None:
            checkpoint.load_weights(self.ema.module, state["ema"], path)
            self.ema.n_averaged.fill_(state["ema_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stretch_schedule()
        if state["scaler"] and self.scaler.is_enabled():   # empty when saved without fp16 (--amp may change)
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.epoch, self.rows = state["epoch"], state["log"]
        self.best = {"iou": state["best_iou"], "epoch": state["best_epoch"], "stale": state["stale_epochs"]}
