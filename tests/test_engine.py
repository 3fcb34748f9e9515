"""engine.py: optimizer and schedule building, the forward pass, the training step, and the state that --resume restores."""
import pytest
import torch

import checkpoint
import config
import rundir
import runtime
from conftest import make_data
from dataset import SegmentationData
from engine import Engine, TrainingDiverged, build_optimizer, build_scheduler, check_finite, forward_loss, predict_logits
from archs import build_model
from utils import UserError
from loaders import make_loaders
from losses import LOSSES
from splits import split


def tiny_cfg(**kw):
    return config.check({**config.DEFAULTS, "arch": "UNet", "input_w": 32, "input_h": 32, "batch_size": 4,
                         "num_workers": 0, "device": "cpu", "optimizer": "Adam", "epochs": 3, "name": "t", **kw})


def tiny_loaders(tmp_path, cfg, rt):
    data = SegmentationData.from_folder(make_data(tmp_path), ".png", ".png", 1, 3)
    return make_loaders(cfg, *split(data, cfg), rt)


@pytest.mark.parametrize("name", config.OPTIMIZERS)
def test_build_optimizer_uses_the_config(name):
    opt = build_optimizer({**config.DEFAULTS, "optimizer": name, "lr": 0.01}, torch.nn.Linear(1, 1).parameters(), False)
    assert type(opt).__name__ == name and opt.param_groups[0]["lr"] == 0.01


def test_reduce_on_plateau_steps_on_validation_loss():
    model = torch.nn.Linear(1, 1)
    cfg = {**config.DEFAULTS, "scheduler": "ReduceLROnPlateau", "patience": 0, "factor": 0.5}
    opt = build_optimizer(cfg, model.parameters(), False)
    sched = build_scheduler(cfg, opt)
    sched.step(1.0)
    sched.step(2.0)   # worse: lr halves at once with patience 0
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_forward_loss_averages_deep_supervision_heads():
    model = build_model({"arch": "NestedUNet", "num_classes": 1, "input_channels": 3, "deep_supervision": True,
                         "base_channels": 8})
    x, y = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss, logits = forward_loss(model, x, y, LOSSES["BCEDiceLoss"](), True)
    heads = model(x)
    expected = sum(LOSSES["BCEDiceLoss"]()(h, y) for h in heads) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits, heads[-1])
    assert torch.equal(predict_logits(model, x, True), heads[-1])


def test_check_finite_names_the_first_bad_batch():
    assert check_finite([torch.tensor(1.0), torch.tensor(3.0)], [1, 3], 1) == pytest.approx(2.5)
    with pytest.raises(TrainingDiverged, match="became nan at epoch 4, batch 2"):
        check_finite([torch.tensor(1.0), torch.tensor(float("nan"))], [2, 2], 4)
    assert TrainingDiverged.exit_code == 3


@pytest.mark.parametrize("memory_format, amp", [("contiguous", "off"), ("channels_last", "bf16")],
                         ids=["cpu-defaults", "gpu-choices-forced-on-cpu"])
def test_an_epoch_trains_and_validates(tmp_path, memory_format, amp):
    """The same code path a GPU takes (channels_last, bf16 autocast, the memory loader), run on the CPU."""
    cfg = tiny_cfg(memory_format=memory_format, amp=amp, loader="memory")
    rt = runtime.build(torch.device("cpu"), cfg)
    assert rt.channels_last == (memory_format == "channels_last") and (rt.amp_dtype is not None) == (amp == "bf16")
    engine = Engine(cfg, rt)
    if rt.channels_last:
        assert engine.model.conv0_0.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    train_loader, val_loader = tiny_loaders(tmp_path, cfg, rt)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    trained, real_step = [], engine.train_step

    def recording_step(images, masks):                  # each training batch's loss and logits, as the epoch saw them
        loss, logits = real_step(images, masks)
        trained.append((loss, logits, masks))
        return loss, logits

    engine.train_step = recording_step
    stats = engine.train_one_epoch(train_loader, 1)
    stats.update(engine.validate(val_loader))
    assert set(stats) == {"loss", "iou", "val_loss", "val_iou", "val_dice"}
    assert any(not torch.equal(before[k], v) for k, v in engine.model.state_dict().items())
    validated = []
    with torch.no_grad():
        for images, masks, _ in val_loader:
            images, masks = rt.place_batch(images, masks)
            with rt.autocast():
                logits = engine.eval_net(images)
            validated.append((engine.criterion(logits, masks), logits, masks))
    # the figures computed here from the same batches: pixels counted over the whole split, losses weighed by images
    assert (stats["loss"], stats["iou"]) == (pytest.approx(mean_loss(trained), rel=1e-5),
                                             pytest.approx(iou_dice(trained)[0], abs=1e-5))
    assert (stats["val_loss"], stats["val_iou"], stats["val_dice"]) == (
        pytest.approx(mean_loss(validated), rel=1e-4), *(pytest.approx(v, abs=1e-5) for v in iou_dice(validated)))


def mean_loss(batches):
    """The mean loss per image of batches (loss, logits, masks)."""
    return sum(loss.item() * len(masks) for loss, _, masks in batches) / sum(len(masks) for *_, masks in batches)


def iou_dice(batches):
    """Data-set IoU and Dice of one-class batches (loss, logits, masks): a pixel is predicted where its logit is > 0."""
    pred = torch.cat([logits.float() > 0 for _, logits, _ in batches])
    true = torch.cat([masks > 0.5 for *_, masks in batches])
    inter, total = (pred & true).sum().item(), pred.sum().item() + true.sum().item()
    return inter / (total - inter), 2 * inter / total


def test_end_epoch_tracks_best_and_stale_epochs():
    engine = Engine(tiny_cfg(early_stopping=2), runtime.build(torch.device("cpu"), tiny_cfg()))
    stats = {"loss": 1.0, "iou": 0.5, "val_loss": 1.0, "val_dice": 0.5}
    assert engine.end_epoch(1, 1e-3, {**stats, "val_iou": 0.5}, 1.23456) is True
    assert engine.end_epoch(2, 1e-3, {**stats, "val_iou": 0.4}, 1.0) is False
    assert not engine.should_stop()
    assert engine.end_epoch(3, 1e-3, {**stats, "val_iou": 0.5}, 1.0) is False   # equal is not better
    assert engine.best == {"iou": 0.5, "epoch": 1, "stale": 2} and engine.should_stop()
    assert [r["epoch"] for r in engine.rows] == [1, 2, 3] and engine.rows[0]["seconds"] == 1.235


def test_state_dict_round_trip_restores_training_exactly(tmp_path):
    """A restored engine takes the same next step as the original: weights, optimizer, schedule, RNG."""
    cfg = tiny_cfg(loader="memory")
    rt = runtime.build(torch.device("cpu"), cfg)
    a = Engine(cfg, rt)
    train_loader, val_loader = tiny_loaders(tmp_path, cfg, rt)
    train_loader.set_epoch(1)
    stats = a.train_one_epoch(train_loader, 1)
    stats.update(a.validate(val_loader))
    a.step_scheduler(stats["val_loss"])
    a.end_epoch(1, 1e-3, stats, 1.0)
    checkpoint.save(a.state_dict(), str(tmp_path / "last.pth"))     # through the file, as --resume reads it
    b = Engine(cfg, rt)
    b.load_state_dict(checkpoint.load(str(tmp_path / "last.pth")))
    assert (b.epoch, b.best, b.rows, b.lr) == (a.epoch, a.best, a.rows, a.lr)
    x, y = torch.randn(4, 3, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()
    a.net.train()     # train_step runs in the mode train_one_epoch sets
    b.net.train()
    loss_a, _ = a.train_step(x, y)
    loss_b, _ = b.train_step(x, y)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_ema_is_validated_saved_as_model_pth_and_resumed(tmp_path):
    cfg = tiny_cfg(loader="memory", ema=0.9)
    rt = runtime.build(torch.device("cpu"), cfg)
    a = Engine(cfg, rt)
    train_loader, val_loader = tiny_loaders(tmp_path, cfg, rt)
    train_loader.set_epoch(1)
    a.train_one_epoch(train_loader, 1)
    raw, avg = a.model.state_dict(), a.ema.module.state_dict()
    key = "conv0_0.conv1.weight"
    assert not torch.equal(raw[key], avg[key]) and a.eval_net is a.ema.module      # a real average, validated
    steps = len(train_loader)
    assert a.ema.steps == steps
    state = a.state_dict()
    assert torch.equal(rundir.evaluated_weights(state)[key], avg[key])              # model.pth holds the average
    checkpoint.save(state, str(tmp_path / "last.pth"))
    b = Engine(cfg, rt)
    b.load_state_dict(checkpoint.load(str(tmp_path / "last.pth")))
    assert torch.equal(b.ema.module.state_dict()[key], avg[key]) and b.ema.steps == steps
    x, y = torch.randn(4, 3, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()
    for e in (a, b):
        e.net.train()
        e.train_step(x, y)
    assert torch.equal(a.ema.module.state_dict()[key], b.ema.module.state_dict()[key])   # the same next average
    plain = Engine(tiny_cfg(loader="memory"), rt)
    assert plain.ema is None and plain.eval_net is plain.net and rundir.evaluated_weights(plain.state_dict()) is not None


def test_resume_with_more_epochs_stretches_the_cosine():
    cfg = tiny_cfg(epochs=2)
    state = Engine(cfg, runtime.build(torch.device("cpu"), cfg)).state_dict()
    longer = Engine(tiny_cfg(epochs=10), runtime.build(torch.device("cpu"), cfg))
    longer.load_state_dict(state)
    assert longer.scheduler.T_max == 10


def test_the_weight_average_warms_up_so_the_first_steps_do_not_linger():
    from engine import WeightAverage
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    average = WeightAverage(model, 0.99)
    average.update()                                            # the first update copies: the initial weights 0
    with torch.no_grad():
        model.weight.fill_(1)                                   # every later step's weights 1
    kept = 1.0                                                  # the share of the initial weights in the average
    for n in range(1, 131):
        average.update()
        kept *= min(0.99, (1 + n) / (10 + n))
    averaged = average.module.weight
    assert torch.allclose(averaged, torch.full((1, 3), 1 - kept)) and kept < 1e-3   # fixed 0.99: 0.27 still
    average.steps = 10_000
    with torch.no_grad():
        averaged.zero_()
    average.update()
    assert torch.allclose(averaged, torch.full((1, 3), 0.01))   # later, the decay asked for
    weight = torch.zeros(())                                    # a captured step's weight tensor gives the same
    average.weight = weight
    with torch.no_grad():
        averaged.zero_()
    average.next_weight()
    average.update(weight)
    assert torch.allclose(averaged, torch.full((1, 3), 0.01)) and average.steps == 10_002        # later, the decay asked for


def test_cuda_graph_on_is_refused_where_it_cannot_run():
    cfg = tiny_cfg(cuda_graph="on")
    with pytest.raises(UserError, match="--cuda_graph on: it needs a CUDA device"):
        Engine(cfg, runtime.build(torch.device("cpu"), cfg))
    plain = Engine(tiny_cfg(), runtime.build(torch.device("cpu"), tiny_cfg()))
    assert not plain.graphed and plain.captured is None


def test_a_learning_rate_held_as_a_tensor_is_saved_as_a_number_and_restored_in_place(tmp_path):
    """A captured step reads its lr from a tensor the schedule fills in place: last.pth holds plain numbers (as an
    uncaptured run's), and loading keeps the tensor that the graph reads."""
    from engine import build_optimizer, plain_numbers
    cfg = tiny_cfg(optimizer="AdamW", lr=0.01)
    net = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(cfg, net.parameters(), fused=False, capturable=True, device="cpu")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    lr_tensor = optimizer.param_groups[0]["lr"]
    assert isinstance(lr_tensor, torch.Tensor)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) < 0.01      # filled in place
    saved = plain_numbers(optimizer.state_dict())
    assert isinstance(saved["param_groups"][0]["lr"], float)
    assert all(isinstance(v, float) for v in plain_numbers(scheduler.state_dict())["_last_lr"])


def test_fused_optimizers_where_torch_has_them_and_plain_ones_elsewhere():
    """runtime asks for fused optimizers on every device; build_optimizer takes them where this torch has a fused
    kernel for the device (AdamW on a CPU since torch 2.4) and the plain one where not (RMSprop has none)."""
    net = torch.nn.Linear(2, 1)
    adamw = build_optimizer(tiny_cfg(optimizer="AdamW"), net.parameters(), fused=True)
    rmsprop = build_optimizer(tiny_cfg(optimizer="RMSprop"), net.parameters(), fused=True)
    assert adamw.param_groups[0]["fused"] is True and not rmsprop.defaults.get("fused")
    assert build_optimizer(tiny_cfg(optimizer="AdamW"), net.parameters(), fused=False).param_groups[0]["fused"] is None
