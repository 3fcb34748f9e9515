"""Why the training step's CUDA graph capture fails at the fast recipe's size: each try in a fresh process.

    python gpu/debug.py --out $OUT          # on the GPU machine
"""
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


def apply_fix(fix):
    """fix: '' | 'nobench' (cudnn.benchmark off while capturing) | 'relaxed' | 'thread_local' | 'nobench_all'."""
    import torch
    import engine
    if fix in ("relaxed", "thread_local"):
        engine.CAPTURE_ERROR_MODE = fix
    if fix == "nobench":
        real = engine.CapturedStep.capture

        def capture(self, images, masks):
            torch.backends.cudnn.benchmark = False
            try:
                return real(self, images, masks)
            finally:
                torch.backends.cudnn.benchmark = True
        engine.CapturedStep.capture = capture
    if fix == "nobench_all":
        real_init = engine.Engine.__init__

        def init(self, cfg, rt):
            real_init(self, cfg, rt)
            torch.backends.cudnn.benchmark = False
        engine.Engine.__init__ = init


def try_capture(fix, batch, px):
    apply_fix(fix)
    import torch
    import config
    import runtime
    from engine import Engine
    cfg = config.check({**config.load_run_config(os.path.join(HERE, "recipes", "dsb2018_fast.yml")),
                        "batch_size": batch, "input_w": px, "input_h": px, "device": "cuda", "cuda_graph": "on"})
    rt = runtime.build(torch.device("cuda"), cfg)
    e = Engine(cfg, rt)
    e.net.train()
    row = {"fix": fix, "batch": batch, "px": px}
    try:
        for i in range(8):
            x, y = torch.randn(batch, 3, px, px), (torch.rand(batch, 1, px, px) > 0.8).float()
            x, y = rt.place_batch(x, y)
            loss = float(e.train_step(x, y)[0])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(30):
            e.train_step(x, y)
        torch.cuda.synchronize()
        row.update(ok=True, loss=loss, img_s=round(30 * batch / (time.perf_counter() - t0), 1))
    except Exception as ex:  # noqa: BLE001
        row.update(ok=False, error=str(ex).splitlines()[0][:300],
                   context=str(ex.__context__).splitlines()[0][:300] if ex.__context__ else None,
                   trace=traceback.format_exc()[-3000:])
    print("ROW " + json.dumps(row), flush=True)


def train_with(fix, argv):
    apply_fix(fix)
    import train
    train.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "--try":
        try_capture(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "--train":
        train_with(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "--bench":
        apply_fix(sys.argv[2])
        import bench
        bench.main(sys.argv[3:])
