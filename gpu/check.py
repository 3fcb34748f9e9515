"""The GPU measurements of issue 39 in one command (for a lent GPU; try it on the CPU first with --tiny).

    python3 gpu/check.py --out $OUT --data inputs/dsb2018_96           # on the GPU machine, about 8 minutes
                                                                       # (the device call carries inputs/dsb2018_96)
    python gpu/check.py --out /tmp/gpucheck --tiny --device cpu        # the same steps, tiny, on a CPU

Each step runs as its own process under its own time limit, so one that fails or runs long costs only itself.
Every figure goes to <out>/gpu.jsonl (one JSON line per step) and each step's output to <out>/<step>.log; the last
lines printed are a short table. Nothing here installs anything.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run_step(name, cmd, out, limit, cwd=HERE):
    """Runs cmd with a time limit; -> (rc, [(seconds since the start, line)] of its output, seconds)."""
    t0 = time.perf_counter()
    lines = []
    log = open(os.path.join(os.environ.get("GPU_LOGS", out), f"{name}.log"), "w")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, line.rstrip("\n")))
            log.write(f"{t:8.2f} {line}")
            if t > limit:
                proc.kill()
                break
        proc.wait(timeout=max(1, limit - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    return proc.returncode, lines, time.perf_counter() - t0


def record(out, row):
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "gpu.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def training(name, args, extra, target_ious, limit):
    """train.py on the fast recipe -> startup, seconds to each target val IoU (from the command's start), best."""
    data = os.path.abspath(args.data)
    fix = os.environ.get("GRAPH_FIX")      # gpu/debug.sh: the capture with this fix, so --cuda_graph on
    launcher = [PY, "gpu/debug.py", "--train", fix] if fix is not None else [PY, "train.py"]
    extra = [*extra, "--cuda_graph", "on"] if fix is not None and "--cuda_graph" not in extra else extra
    cmd = [*launcher, "--config", args.recipe, "--data_dir", os.path.dirname(data), "--dataset",
           os.path.basename(data), "--device", args.device, "--name", name, "--runs_dir", args.runs, "--overwrite",
           *extra]
    rc, lines, total = run_step(name, cmd, args.out, limit)
    row = {"step": name, "rc": rc, "extra": " ".join(extra), "total_s": round(total, 1)}
    best, reached = 0.0, {}
    for t, line in lines:
        if "run folder" in line and "startup_s" not in row:
            row["startup_s"] = round(t, 2)
            row["startup_line"] = line[:200]
        if line.startswith("epoch ") and "val_iou" in line:
            iou = float(line.split("val_iou")[1].split()[0])
            best = max(best, iou)
            for target in target_ious:
                if iou >= target and target not in reached:
                    reached[target] = (round(t, 2), int(line.split()[1].split("/")[0]))
    row.update(best_val_iou=round(best, 4), seconds_to=reached,
               last_lines=[line for _, line in lines[-4:]])
    return row


def prediction(name, args, extra, limit):
    """val.py on a trained run -> its seconds and the IoU lines."""
    cmd = [PY, "val.py", "--name", name, "--runs_dir", args.runs, "--device", args.device, "--output",
           os.path.join(args.runs + "_outputs", name + "_".join(extra).replace("-", "")), *extra]
    rc, lines, total = run_step("val_" + name + "".join(extra).replace("-", "_"), cmd, args.out, limit)
    ious = [line for _, line in lines if line.startswith("IoU") or "network input" in line]
    return {"step": f"val-{name}{' '.join(extra)}", "rc": rc, "total_s": round(total, 1), "iou_lines": ious,
            "images": 134}


def bench(step, args, flags, limit):
    fix = os.environ.get("GRAPH_FIX")
    launcher = [PY, "gpu/debug.py", "--bench", fix] if fix is not None else [PY, "bench.py"]
    flags = [*flags, "--cuda_graph", "on"] if fix is not None and "--cuda_graph" not in flags else flags
    cmd = [*launcher, "--device", args.device, "--data", args.data, "--recipe", args.recipe, *flags]
    rc, lines, total = run_step(step, cmd, args.out, limit)
    rows = []
    for _, line in lines:
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return {"step": step, "rc": rc, "total_s": round(total, 1), "rows": rows,
            "tail": [line for _, line in lines[-3:]] if rc else []}


def graph_check(device):
    """The captured step against the eager one from the same weights on the same batches: losses and weights after
    a few steps (bf16 autocast: they agree to about 1e-2, not bit for bit) -> one JSON line."""
    sys.path.insert(0, HERE)
    import torch
    import config
    import runtime
    from engine import Engine
    cfg = config.check({**config.DEFAULTS, "arch": "NestedUNet", "optimizer": "AdamW", "lr": 2e-3, "ema": 0.99,
                        "batch_size": 8, "input_w": 64, "input_h": 64, "device": device})
    batches = [(torch.randn(8, 3, 64, 64), (torch.rand(8, 1, 64, 64) > 0.8).float()) for _ in range(8)]
    results = {}
    for mode in ("off", "on" if device != "cpu" else "off"):
        cfg["cuda_graph"] = mode
        rt = runtime.build(torch.device(device), cfg)
        engine = Engine(cfg, rt)
        engine.net.train()
        losses = []
        for x, y in batches:
            x, y = rt.place_batch(x, y)
            losses.append(float(engine.train_step(x, y)[0]))
        weights = torch.cat([p.detach().float().flatten() for p in engine.model.parameters()])
        average = torch.cat([p.detach().float().flatten() for p in engine.ema.module.parameters()])
        results[mode] = (losses, weights, average, engine.graphed, engine.ema.steps, engine.lr)
    off, on = results["off"], results["on" if device != "cpu" else "off"]
    print(json.dumps({"step": "graph_check", "graphed": on[3], "losses_eager": [round(v, 4) for v in off[0]],
                      "losses_graph": [round(v, 4) for v in on[0]],
                      "weights_rel_diff": float((off[1] - on[1]).norm() / off[1].norm()),
                      "average_rel_diff": float((off[2] - on[2]).norm() / off[2].norm()),
                      "ema_steps": [off[4], on[4]], "lr": [off[5], on[5]]}), flush=True)


def main():
    if sys.argv[1:2] == ["--graph_check"]:
        return graph_check(sys.argv[2])
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="inputs/dsb2018_96")
    p.add_argument("--device", default="cuda")
    p.add_argument("--recipe", default=os.path.join(HERE, "recipes", "dsb2018_fast.yml"))
    p.add_argument("--tiny", action="store_true", help="a CPU try of every step: 2 epochs, tiny settings")
    p.add_argument("--only", help="comma-separated step names to run")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    args.runs = os.path.join(args.out, "runs") if args.tiny else "/tmp/gpu_runs"
    t0 = time.perf_counter()
    tiny_train = ["--epochs", "2", "--base_channels", "4", "--input_w", "32", "--input_h", "32"] if args.tiny else []
    tiny_bench = ["--quick", "--epochs", "1", "--steps", "3"] if args.tiny else []
    want = set(args.only.split(",")) if args.only else None

    def wanted(name):
        return want is None or name in want

    if wanted("info"):
        rc, lines, _ = run_step("info", ["bash", "-c", "nvidia-smi -L; nvidia-smi --query-gpu=clocks.sm,clocks.mem,"
                                         "temperature.gpu,utilization.gpu --format=csv; " + PY +
                                         " -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; "
                                         "nproc"], args.out, 60)
        record(args.out, {"step": "info", "lines": [line for _, line in lines]})
    steps = [
        ("graph_check", lambda: {**json.loads(next(line for _, line in run_step(
            "graph_check", [PY, __file__, "--graph_check", args.device], args.out, 60)[1] if line.startswith("{"))),
            "step": "graph_check"}),
        ("fast", lambda: training("fast", args, tiny_train, (0.80, 0.82, 0.84, 0.85), 100)),
        ("val_fast", lambda: prediction("fast", args, [], 90)),
        ("fast_graph", lambda: training("fast_graph", args, tiny_train + ["--cuda_graph", "on"], (0.80, 0.82, 0.85),
                                        150)),
        ("rates", lambda: bench("rates", args, ["--archs", "NestedUNet,UNet", "--epochs", "3", *tiny_bench], 200)),
        ("fixed", lambda: bench("fixed", args, ["--fixed_costs", "--archs", "NestedUNet", "--epochs", "3"]
                                + (["--quick"] if args.tiny else []), 90)),
        ("fixed_graph", lambda: bench("fixed_graph", args, ["--fixed_costs", "--archs", "NestedUNet", "--epochs", "3",
                                                            "--cuda_graph", "on"] + (["--quick"] if args.tiny else []), 90)),
        ("variants", lambda: bench("variants", args, ["--variants", "reference,toolkit,graph,batch64,batch128",
                                                      "--archs", "NestedUNet", *tiny_bench], 100)),
        ("fast_seed1", lambda: training("fast_seed1", args, tiny_train + ["--seed", "1"], (0.80, 0.82, 0.85), 100)),
        ("fast_seed2", lambda: training("fast_seed2", args, tiny_train + ["--seed", "2"], (0.80, 0.82, 0.85), 100)),
        ("val_fast_tta", lambda: prediction("fast", args, ["--tta"], 90)),
        ("fast_b64", lambda: training("fast_b64", args, tiny_train + ["--batch_size", "64", "--lr", "0.003"],
                                      (0.80, 0.82, 0.85), 100)),
        ("reduce_overhead", lambda: bench("reduce_overhead", args, ["--variants", "compile_reduce_overhead",
                                                                    "--archs", "NestedUNet", *tiny_bench], 100)),
    ]
    for name, step in steps:
        if not wanted(name):
            continue
        try:
            row = step()
        except Exception as e:  # noqa: BLE001 - one step's failure must not cost the others
            row = {"step": name, "error": repr(e)}
        row["at_s"] = round(time.perf_counter() - t0, 1)
        record(args.out, row)


if __name__ == "__main__":
    main()
