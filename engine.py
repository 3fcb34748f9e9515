"""The training engine that train.py, val.py and bench.py share.

Engine holds what changes while a run trains - network, optimizer, schedule, AMP scaler, loss,
and the progress (epoch, best score, log rows) - built once from the config and a Runtime, with
state_dict()/load_state_dict() for last.pth. Its train_one_epoch() and validate() are the loop
bodies; forward_loss() and predict_logits() are the forward pass (with the deep-supervision
heads) that val.py and bench.py use too.
"""
import copy
import math
import sys
import time
import warnings

import torch
from torch.profiler import record_function
from tqdm import tqdm

import checkpoint
import distributed
from archs import build_model, final_logits
from losses import LOSSES
from metrics import SegMeter, binarize
from rundir import LAST
from utils import UserError, duration, progress_bar, seed_everything

SYNC_EVERY = 10  # batches between host syncs (progress bar, NaN check): syncing each batch stalls a GPU
PROGRESS_EVERY = 30.0   # seconds between the progress lines of a long epoch or validation in a log file


class ProgressLines:
    """A line on stdout every PROGRESS_EVERY seconds while a loop of `total` batches runs, for a log file
    (`python train.py ... > train.log`): tqdm's bar draws only on a terminal. Off where that bar shows on the
    terminal stdout is, and where show is False (Engine.progress_lines: train.py's first process only)."""

    def __init__(self, what, total, show=True):
        self.what, self.total = what, total
        self.on = show and not (sys.stdout.isatty() and sys.stderr.isatty())
        self.start = self.last = time.monotonic()

    def tick(self, done, loss=None):
        """After `done` batches (and the mean loss so far, if known): a line if PROGRESS_EVERY has passed."""
        now = time.monotonic()
        if not self.on or now - self.last < PROGRESS_EVERY:
            return
        self.last, elapsed = now, now - self.start
        left = f", about {duration(elapsed / done * (self.total - done))} left of it" if done < self.total else ""
        said = f", loss {loss:.4f}" if loss is not None else ""
        print(f"  {self.what}: batch {done} of {self.total}{said} ({duration(elapsed)} in{left})", flush=True)


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""
    exit_code = 3


GRAPH_OPTIMIZERS = ("Adam", "AdamW")   # torch's capturable optimizers among OPTIMIZERS (a CUDA graph replays their step)


def build_optimizer(cfg, params, fused, capturable=False, device=None):
    """The optimizer; `fused`: the single-kernel implementations where torch has them (CUDA, and CPUs since torch 2.4:
    on a CPU the fused AdamW made a narrow UNet's step 3-4% faster, BENCHMARKS.md; where this torch has none for the
    device, the plain one). capturable (Adam, AdamW): safe to capture in a CUDA graph, its learning rate a tensor on
    `device` that the schedule fills in place."""
    params = list(params)
    try:
        return make_optimizer(cfg, params, fused or None, capturable, device)
    except RuntimeError:
        if not fused:
            raise
        return make_optimizer(cfg, params, None, capturable, device)


def make_optimizer(cfg, params, fused, capturable, device):
    name, lr, wd = cfg["optimizer"], cfg["lr"], cfg["weight_decay"]
    if capturable:
        lr = torch.tensor(lr, dtype=torch.float32, device=device)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=wd,
                               fused=fused)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused, capturable=capturable)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused, capturable=capturable)
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


def ema_decay(decay, steps):
    """The --ema decay after `steps` updates, ramped up as min(decay, (1 + n) / (10 + n)) (TensorFlow's num_updates
    rule), so that the first steps' near-random weights do not linger in the average: with a fixed 0.99, 27% of the
    initial weights were still in it after 130 steps, and it predicted foreground everywhere."""
    return min(decay, (1 + steps) / (10 + steps))


class WeightAverage:
    """--ema: an exponential moving average of a network's weights and BatchNorm statistics, updated after every
    step. `module` is the averaged copy (validated, saved as model.pth); `steps` counts the updates on the host.

    torch's AveragedModel reads its update counter from the device twice per step (a host sync that stalls a GPU
    step after step); here the count lives on the host and the update is a handful of foreach kernels. For a
    captured CUDA graph the weight (1 - decay) is a device tensor, filled before each replay."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.steps = decay, 0
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        self.float_pairs = ([a for a, _ in floats], [c for _, c in floats])
        self.other_pairs = [(a, c) for a, c in zip(averaged, current) if not a.is_floating_point()]  # BN's counters
        self.weight = None     # (1 - decay) as a device tensor, for a captured step

    @torch.no_grad()
    def update(self, weight=None):
        """One update after a step; weight: a device tensor holding 1 - decay (inside a CUDA graph), else the
        decay is computed here from the host's count. The first update copies the weights."""
        averaged, current = self.float_pairs
        if self.steps == 0 and weight is None:
            torch._foreach_copy_(averaged, current)
            for a, c in self.other_pairs:
                a.copy_(c)
        else:
            w = 1 - ema_decay(self.decay, self.steps) if weight is None else weight
            torch._foreach_lerp_(averaged, current, w)
            for a, c in self.other_pairs:
                a.copy_(a * (1 - w) + c * w)
        self.steps += 1

    def next_weight(self):
        """1 - the decay of the next update, into the device tensor a captured step reads."""
        self.weight.fill_(1 - ema_decay(self.decay, self.steps))


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
        self.graphed = use_cuda_graph(cfg, rt)
        self.optimizer = build_optimizer(cfg, self.model.parameters(), rt.fused, self.graphed, rt.device)
        # --ema: an exponential moving average of the weights (and BatchNorm statistics) after every step; it is
        # what is validated and saved as model.pth, and smooths out the epoch-to-epoch swings of the raw weights
        self.ema = WeightAverage(self.model, cfg["ema"]) if cfg["ema"] else None
        self.captured = CapturedStep(self) if self.graphed else None
        # the scaler is a no-op unless fp16 autocast, whose small gradients would underflow without it
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
        self.criterion = LOSSES[cfg["loss"]]()
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.epoch, self.rows = 0, []
        self.best = {"iou": -1.0, "epoch": 0, "stale": 0}
        self.progress_lines = False   # ProgressLines on stdout in long loops: train.py's log, not bench.py's JSON

    def start_from(self, state):
        """--init: initial weights (a state_dict of this network, pretrained.adapted gives it) instead of the random
        ones, in the network and its weight average; the optimizer has no state yet, so nothing else changes."""
        self.model.load_state_dict(state)
        if self.ema is not None:
            self.ema.module.load_state_dict(state)

    @property
    def eval_net(self):
        """What validation runs and model.pth holds: the weight average with --ema, else the network itself."""
        return self.ema.module if self.ema is not None else self.net

    @property
    def lr(self):
        """The learning rate in force now (a float, also when the optimizer holds it as a tensor)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, images, masks):
        """Forward, backward and optimizer step on one batch already on the device -> (loss, final logits): the
        captured CUDA graph's replay with --cuda_graph on (after its warm-up steps), else eager_step."""
        if self.captured is not None:
            return self.captured(images, masks)
        return self.eager_step(images, masks)

    def eager_step(self, images, masks, ema_weight=None):
        """train_step run op by op; under a CUDA graph capture, the operations the graph records.

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
                self.ema.update(ema_weight)
        return loss.detach(), logits.detach()

    def train_one_epoch(self, loader, epoch):
        """One pass over the training split -> {'loss', 'iou'} (data-set-level IoU of the batches seen)."""
        self.net.train()
        meter = SegMeter(self.cfg["num_classes"], self.rt.device)
        batch_losses, sizes = [], []   # kept on the device; read every SYNC_EVERY batches
        desc = f"epoch {epoch}/{self.cfg['epochs']}"
        bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                   disable=None if self.rt.main else True)   # no bar in logs, nor on other processes than the first
        lines, mean_loss = ProgressLines(desc, len(loader), self.progress_lines), None
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
            lines.tick(step, mean_loss)
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
        lines = ProgressLines("validation", len(loader), self.progress_lines)
        for batch, (images, masks, _) in enumerate(progress_bar(loader, "validation", show=self.rt.main), 1):
            images, masks = self.rt.place_batch(images, masks)
            with self.rt.autocast():
                loss, logits = forward_loss(net, images, masks, self.criterion, self.cfg["deep_supervision"])
            total_loss += loss.float() * images.shape[0]
            count += images.shape[0]
            meter.update(binarize(logits.float(), self.cfg["class_mode"]), masks)
            lines.tick(batch)
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
        """Everything a resumed run needs: the objects' states, the progress, RNG states and the config. Learning
        rates are plain numbers in it, also when a capturable optimizer holds them as device tensors."""
        return {"model": self.model.state_dict(), "optimizer": plain_numbers(self.optimizer.state_dict()),
                "scheduler": plain_numbers(self.scheduler.state_dict()), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "best_iou": self.best["iou"], "best_epoch": self.best["epoch"], "stale_epochs": self.best["stale"],
                "log": self.rows, "rng": checkpoint.rng_state(), "config": self.cfg,
                "ema": None if self.ema is None else self.ema.module.state_dict(),
                "ema_steps": 0 if self.ema is None else self.ema.steps}

    def snapshot(self):
        """state_dict() with its tensors copied on their device (milliseconds; no wait for a GPU): what a background
        writer saves while training changes the originals."""
        return checkpoint.device_copy(self.state_dict())

    def stretch_schedule(self):
        """--epochs changed on resume: the cosine is redrawn to end at the new last epoch, from where it stands
        (the lr in force becomes the closed-form value for the epochs done; a finished run starts climbing back)."""
        if not hasattr(self.scheduler, "T_max") or self.scheduler.T_max == self.cfg["epochs"]:
            return
        self.scheduler.T_max = self.cfg["epochs"]
        done, base, floor = self.scheduler.last_epoch, self.scheduler.base_lrs, self.scheduler.eta_min
        for group, base_lr in zip(self.optimizer.param_groups, base):
            set_lr(group, floor + (base_lr - floor) * (1 + math.cos(math.pi * done / self.cfg["epochs"])) / 2)
        self.scheduler._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def load_state_dict(self, state, path=LAST):
        """Restores a state_dict() (from last.pth at `path`, named in errors)."""
        checkpoint.load_weights(self.model, state["model"], path)
        if self.ema is not None:
            checkpoint.load_weights(self.ema.module, state["ema"], path)
            self.ema.steps = int(state["ema_steps"])
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, lrs):   # a captured step reads the lr from its tensor
            if isinstance(lr, torch.Tensor):
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
        if self.graphed:        # the saved groups' settings replaced this optimizer's: a captured step needs these
            for group in self.optimizer.param_groups:
                group["capturable"] = True
            for param, st in self.optimizer.state.items():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(param.device, torch.float32)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stretch_schedule()
        if state["scaler"] and self.scaler.is_enabled():   # empty when saved without fp16 (--amp may change)
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.epoch, self.rows = state["epoch"], state["log"]
        self.best = {"iou": state["best_iou"], "epoch": state["best_epoch"], "stale": state["stale_epochs"]}


def set_lr(group, lr):
    """Sets a parameter group's learning rate, in place when it is a tensor (a captured step reads that tensor)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def plain_numbers(state):
    """An optimizer's or scheduler's state_dict with one-element learning-rate tensors as floats (last.pth stays the
    same whether the run captured its step or not)."""
    def plain(v):
        return float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
    out = dict(state)
    if "param_groups" in out:
        out["param_groups"] = [{k: plain(v) if k in ("lr", "initial_lr") else v for k, v in g.items()}
                               for g in out["param_groups"]]
    for key in ("base_lrs", "_last_lr"):
        if key in out:
            out[key] = [plain(v) for v in out[key]]
    return out


def use_cuda_graph(cfg, rt):
    """Whether the training step is captured as a CUDA graph (--cuda_graph on): on one CUDA process, with an
    optimizer torch can capture, no fp16 loss scaling (its skipped steps are decided on the host) and no
    torch.compile; a UserError says why not."""
    if cfg["cuda_graph"] != "on":
        return False
    why_not = ("it needs a CUDA device" if not rt.cuda else
               "torchrun runs several processes" if rt.active else
               f"--optimizer {cfg['optimizer']} cannot be captured (use {' or '.join(GRAPH_OPTIMIZERS)})"
               if cfg["optimizer"] not in GRAPH_OPTIMIZERS else
               "--amp fp16 scales the loss on the host" if rt.amp_dtype == torch.float16 else
               "--compile captures graphs of its own" if cfg["compile"] else None)
    if why_not:
        raise UserError(f"--cuda_graph on: {why_not}; drop it (or pass --cuda_graph off)")
    return True


CAPTURE_ERROR_MODE = "global"   # torch.cuda.graph's: what other CUDA calls during the capture are refused


class CapturedStep:
    """The training step as one CUDA graph, replayed for every batch: a GPU step of a small network is a few
    milliseconds of kernels, and launching its ~1,000 kernels one by one from Python took longer than running them
    (BENCHMARKS.md). PyTorch's whole-network recipe: WARMUP eager steps on a side stream (the optimizer's state and
    cudnn's choices exist before the capture), then the capture of forward, backward, optimizer step and weight
    average on static input buffers; each later batch is copied into those buffers and the graph replayed. The
    training batches all have one shape (the last partial batch is dropped), so one graph serves the whole run."""

    WARMUP = 3

    def __init__(self, engine):
        self.engine, self.graph, self.eager_steps = engine, None, 0
        self.images = self.masks = self.loss = self.logits = None

    def __call__(self, images, masks):
        engine = self.engine
        if self.graph is not None and images.shape != self.images.shape:
            return engine.eager_step(images, masks)          # another shape (bench.py's batches): not captured
        if self.graph is None and self.eager_steps < self.WARMUP:
            self.eager_steps += 1
            side = torch.cuda.Stream(engine.rt.device)
            side.wait_stream(torch.cuda.current_stream(engine.rt.device))
            with torch.cuda.stream(side):
                out = engine.eager_step(images, masks)
            torch.cuda.current_stream(engine.rt.device).wait_stream(side)
            return out
        if self.graph is None:
            try:
                self.capture(images, masks)
            except RuntimeError as e:       # a kernel that cannot be captured: the run goes on eagerly
                first = e.__context__ or e     # the error inside the capture, not the capture's end that followed
                warnings.warn(f"--cuda_graph on: the training step could not be captured ({str(first).splitlines()[0]}"
                              "); it runs op by op", stacklevel=2)
                engine.captured = None
                engine.optimizer.zero_grad(set_to_none=True)
                return engine.eager_step(images, masks)
        self.images.copy_(images)
        self.masks.copy_(masks)
        if engine.ema is not None:
            engine.ema.next_weight()
        self.graph.replay()
        if engine.ema is not None:
            engine.ema.steps += 1
        return self.loss.clone(), self.logits

    def capture(self, images, masks):
        engine = self.engine
        self.images, self.masks = images.clone(), masks.clone()
        if engine.ema is not None:
            engine.ema.weight = torch.zeros((), device=engine.rt.device)
        engine.optimizer.zero_grad(set_to_none=True)   # the graph's backward writes the gradients, not adds to them
        graph = torch.cuda.CUDAGraph()
        steps = engine.ema.steps if engine.ema is not None else 0
        # cudnn's autotuning synchronises the device, which a capture forbids: the warm-up steps have tuned every
        # convolution, and a shape it has not seen takes cudnn's heuristic choice instead
        benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        torch.cuda.synchronize(engine.rt.device)
        try:
            with torch.cuda.graph(graph, capture_error_mode=CAPTURE_ERROR_MODE):
                self.loss, self.logits = engine.eager_step(self.images, self.masks,
                                                           engine.ema.weight if engine.ema is not None else None)
        finally:
            torch.backends.cudnn.benchmark = benchmark
            if engine.ema is not None:
                engine.ema.steps = steps     # the capture recorded the update; it did not run it
        self.graph = graph
