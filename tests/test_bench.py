"""bench.py's measuring modes on a generated data set: the profile's phases, the step variants, the FLOP count."""
import json
import os

import pytest
import torch

import bench
import config
import runtime
from conftest import make_data, run_main

SMALL = ["--device", "cpu", "--archs", "UNet", "--batch_size", "4", "--steps", "2", "--amp", "off"]


@pytest.fixture
def bench_data(tmp_path):
    """24 generated 32x32 images, and SMALL's recipe (the CPU recipe at 32 pixels) -> the argument list."""
    recipe = tmp_path / "recipe32.yml"
    recipe.write_text(open(os.path.join(bench.HERE, "recipes", "dsb2018_cpu.yml")).read()
                      .replace("input_w: 96", "input_w: 32").replace("input_h: 96", "input_h: 32"))
    return SMALL + ["--recipe", str(recipe), "--data", make_data(tmp_path / "inputs", name="b", n=24, size=32)]


def rows(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def small_cfg(**kw):
    base = config.load_run_config("recipes/dsb2018_cpu.yml")
    return config.check({**base, "device": "cpu", "amp": "off", "input_h": 32, "input_w": 32, **kw})


@pytest.mark.e2e
def test_profile_accounts_for_the_epoch_in_named_phases(bench_data, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(bench.main, bench_data + ["--profile"], bench.HERE, monkeypatch,
                              capsys)
    assert code == 0, err
    (row,) = rows(out)
    phases = row["phases_s"]
    assert set(phases) == {*bench.PHASES, "rest"}
    # each labelled phase ran, and the labels cover the profiled epoch (the rest is the loop itself)
    for name in ("data", "forward", "backward", "optimizer", "ema", "metrics"):   # the recipe averages weights
        assert phases[name] > 0, (name, phases)
    assert min(phases["place"], phases["sync"]) >= 0                 # microseconds
    assert abs(sum(phases.values()) - row["profiled_epoch_s"]) < 1e-3
    assert 0 <= phases["rest"] < 0.5 * row["profiled_epoch_s"], phases
    assert row["images"] == (24 - 5) // 4 * 4         # the training split (a fifth held out) in whole batches
    assert row["top_self_ops_s"] and all(k not in bench.PHASES for k in row["top_self_ops_s"])


def test_labelled_loader_yields_the_same_batches_inside_data_ranges():
    batches = [(torch.full((1,), float(i)),) for i in range(3)]
    labelled = bench.Labelled(batches)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        seen = list(labelled)
    assert len(labelled) == 3 and [b[0].item() for b in seen] == [0, 1, 2]
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("data") == 4                    # three batches and the fetch that ends the loop


@pytest.mark.e2e
def test_variants_rows_are_ratios_over_the_reference(bench_data, monkeypatch, capsys):
    code, out, err = run_main(bench.main, bench_data + ["--variants", "reference,fused_adamw,batch32"], bench.HERE, monkeypatch, capsys)
    assert code == 0, err
    got = {r["case"]: r for r in rows(out)}
    assert set(got) == {"variant-UNet-reference", "variant-UNet-fused_adamw", "variant-UNet-batch32"}
    assert got["variant-UNet-batch32"]["batch_size"] == 32 and got["variant-UNet-fused_adamw"]["batch_size"] == 4
    assert got["variant-UNet-reference"]["batch_size"] == bench.REFERENCE_BATCH   # whatever the config says
    for r in got.values():
        assert r["img_s"] > 0 and r["over_reference"] == pytest.approx(r["img_s"] / r["reference_img_s"], abs=0.01)


def test_unknown_variant_is_named(bench_data, monkeypatch, capsys):
    code, _, err = run_main(bench.main, bench_data + ["--variants", "reference,turbo"], bench.HERE,
                            monkeypatch, capsys)
    assert code == 2 and "--variants: unknown turbo" in err and "compile_max_autotune" in err, err


@pytest.mark.parametrize("name", ["toolkit", "fused_adamw", "bf16_weights"])
def test_variant_steps_train_the_network(name):
    cfg = small_cfg(batch_size=2, amp="bf16")      # bf16 weights need bf16 autocast
    rt = runtime.build(torch.device("cpu"), cfg)
    step, batch = bench.variant_step(cfg, rt, name)
    assert batch == 2
    step()                                            # runs a whole step without error, in its own precision


def test_flop_count_grows_with_pixels_and_architecture():
    unet32, unet64 = bench.train_flop_per_image(small_cfg()), bench.train_flop_per_image(small_cfg(input_h=64,
                                                                                                     input_w=64))
    assert unet64 == pytest.approx(4 * unet32, rel=0.02)
    assert bench.train_flop_per_image(small_cfg(arch="NestedUNet")) > 2 * unet32


@pytest.mark.e2e
def test_limits_time_each_convolution_of_the_network(bench_data, monkeypatch, capsys):
    code, out, err = run_main(bench.main, bench_data + ["--limits"], bench.HERE, monkeypatch, capsys)
    assert code == 0, err
    (row,) = rows(out)
    net = bench.build_model(small_cfg())
    assert row["convolutions"] == sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert row["pure_over_convolutions_only"] == pytest.approx(row["pure_img_s"] / row["convolutions_only_img_s"],
                                                               rel=0.05)
    shares = row["slowest_convolutions"]
    values = list(shares.values())
    assert len(values) == 6 and values == sorted(values, reverse=True)            # the slowest first
    # shares of the time of all the convolutions (rounded to 0.001): the 6 slowest of N take at least 6/N of it
    assert 6 / row["convolutions"] - 0.003 <= sum(values) <= 1.003
    assert all(name.split()[0] in dict(net.named_modules()) for name in shares)   # named as the network names them


def test_network_convolutions_in_forward_order_with_their_inputs():
    cfg = small_cfg(batch_size=2)
    rt = runtime.build(torch.device("cpu"), cfg)
    convs = bench.network_convolutions(cfg, rt)
    assert convs[0][2] == (2, 3, 32, 32)               # the first reads the images
    assert all(shape[1] == conv.in_channels for _, conv, shape in convs)
    step = bench.convolution_step(convs[1][1], convs[1][2], rt, input_grad=True)
    step()
    assert convs[1][1].weight.grad is not None         # a training step: backward reached the weights


@pytest.mark.parametrize("flags, says", [(["--steps", "0"], "--steps must be at least 1"),
                                          (["--epochs", "-1"], "--epochs must be at least 1"),
                                          (["--time_to_iou", "80"], "--time_to_iou is a validation IoU"),
                                          (["--limits", "--amps", "auto,off"], "--limits measures one: pass --amp")])
def test_flag_mistakes_are_named(bench_data, flags, says, monkeypatch, capsys):
    code, _, err = run_main(bench.main, bench_data + flags, bench.HERE, monkeypatch, capsys)
    assert code == 2 and says in err and "Traceback" not in err, err


def test_seeds_need_a_target(bench_data, monkeypatch, capsys):
    code, _, err = run_main(bench.main, bench_data + ["--seeds", "0,1"], bench.HERE, monkeypatch, capsys)
    assert code == 2 and "pass --time_to_iou too" in err, err


@pytest.mark.e2e
def test_time_to_iou_per_seed(bench_data, monkeypatch, capsys):
    """Each seed's training is its own timed run of train.py; a target no run reaches is None, never a time."""
    argv = bench_data + ["--epochs", "1", "--time_to_iou", "1.0", "--seeds", "3,4"]
    monkeypatch.setattr(bench, "timed_run", lambda recipe, data, device, extra, target: {
        "startup_s": 1.0, "seconds_to_iou": None, "best_val_iou": 0.5, "seed_args": extra[-2:]})
    code, out, err = run_main(bench.main, argv, bench.HERE, monkeypatch, capsys)
    assert code == 0, err
    (row,) = rows(out)
    assert [r["seed"] for r in row["runs"]] == [3, 4]
    assert [r["seed_args"] for r in row["runs"]] == [["--seed", "3"], ["--seed", "4"]]
    assert row["target_iou"] == 1.0 and all(r["seconds_to_iou"] is None for r in row["runs"])
    # the epoch's rate over the pure rate of the same engine timed right after it
    assert row["e2e_over_adjacent_pure"] > 0


@pytest.mark.e2e
def test_e2e_rate_pairs_each_epoch_with_a_pure_window_only_when_asked(tmp_path):
    data = bench.SegmentationData.decode(bench.scan(make_data(tmp_path, name="e", n=12, size=32), ".png", ".png", 1),
                                         3, None, "e")
    cfg = small_cfg(batch_size=4, loader="memory")
    rt = runtime.build(torch.device("cpu"), cfg)
    assert bench.e2e_rate(cfg, rt, data, 1)["e2e_over_adjacent_pure"] is None
    assert bench.e2e_rate(cfg, rt, data, 2, steps=2)["e2e_over_adjacent_pure"] > 0


@pytest.mark.e2e
def test_fixed_costs_account_for_the_epoch_part_by_part(bench_data, monkeypatch, capsys):
    code, out, err = run_main(bench.main, bench_data + ["--fixed_costs", "--epochs", "1"], bench.HERE, monkeypatch,
                              capsys)
    assert code == 0, err
    (row,) = rows(out)
    parts = row["per_epoch_s"]
    assert row["case"] == "fixed-UNet-w4-32px-b4" and row["batches"] == 4      # 24 images: 19 training, 4 batches
    assert row["epoch_s"] == pytest.approx(parts["train_s"] + parts["validate_s"] + parts["schedule_and_log_s"]
                                           + parts["files_s"], abs=2e-4)
    assert row["pure_train_s"] == pytest.approx(row["per_batch_ms"]["step"] * row["batches"] / 1e3, rel=0.01)
    assert row["e2e_over_pure"] == pytest.approx(row["pure_train_s"] / parts["train_s"], rel=0.01)
    assert row["per_batch_ms"]["ema"] > 0 and row["save_every"] == 30.0      # the CPU recipe averages the weights
