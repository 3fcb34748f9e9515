"""compare.py: one table of several runs, and their curves in one plot (runs trained here, in this process)."""
import os

import yaml

import compare
import train
import val
from conftest import make_data, run_main

FAST = ["--base_channels", "8", "--dataset", "tiny", "--arch", "UNet", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0",
        "--optimizer", "Adam"]


def test_a_table_of_runs_with_the_settings_that_differ_and_one_plot(tmp_path, monkeypatch, capsys):
    make_data(tmp_path / "inputs")
    for name, extra in (("short", ["--epochs", "1"]), ("longer", ["--epochs", "2", "--lr", "3e-4"])):
        code, _, err = run_main(train.main, FAST + extra + ["--name", name], tmp_path, monkeypatch, capsys)
        assert code == 0, err
    code, _, err = run_main(val.main, ["--name", "short"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_main(compare.main, ["--plot", "runs.png"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    header, first, second = out.splitlines()[:3]
    assert header.split()[:3] == ["name", "arch", "settings"]
    assert first.startswith("longer") and "epochs=2, lr=0.0003" in first and "2/2" in first
    assert second.startswith("short") and "epochs=1, lr=0.001" in second and "1/1" in second
    per_image = [float(v) for v in [line.split(",")[1] for line in
                                    open(tmp_path / "outputs" / "short" / "metrics.csv").read().splitlines()[1:]]]
    assert second.split()[-2] == f"{sum(per_image) / len(per_image):.4f}"  # val.py's figure for the evaluated run
    assert first.split()[-2] == "-"                                       # 'longer' was never evaluated
    assert os.path.getsize(tmp_path / "runs.png") > 1000
    code, _, err = run_main(compare.main, ["short", "--plot", "runs.png"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "runs.png exists" in err                       # never replaced


def test_a_name_that_is_not_a_run_is_refused(tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "models" / "notes")
    code, _, err = run_main(compare.main, ["notes"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "models/notes is not a run (no config.yml)" in err
    yaml.safe_dump({"arch": "UNet"}, open(tmp_path / "models" / "notes" / "config.yml", "w"))
    code, out, err = run_main(compare.main, [], tmp_path, monkeypatch, capsys)
    assert code == 0 and out.splitlines()[1].startswith("notes"), err    # a run without log.csv: dashes
