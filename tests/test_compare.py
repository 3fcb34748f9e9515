"""compare.py: one table of several runs, and their curves in one plot (runs trained here, in this process)."""
import os

import pytest
import yaml

import compare
import train
import val
from conftest import make_data, run_main

FAST = ["--base_channels", "8", "--dataset", "tiny", "--arch", "UNet", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0",
        "--optimizer", "Adam"]


@pytest.mark.e2e
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


def with_nan_val_iou(text):
    header, first, *rest = text.splitlines()
    values = first.split(",")
    values[header.split(",").index("val_iou")] = "nan"
    return "\n".join([header, ",".join(values), *rest]) + "\n"


def broken_runs(tmp_path, monkeypatch, capsys):
    """One good run (trained here) and copies of it whose log.csv or config.yml is broken in different ways."""
    make_data(tmp_path / "inputs")
    code, _, err = run_main(train.main, FAST + ["--epochs", "1", "--name", "good"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    good = tmp_path / "models" / "good"
    breakers = {
        "latin1": lambda d: (d / "log.csv").write_bytes((good / "log.csv").read_bytes() + b"\xff\xfe,1\n"),
        "no_val_iou": lambda d: (d / "log.csv").write_text("epoch,loss,seconds\n1,0.5,2.0\n"),
        "log_folder": lambda d: os.makedirs(d / "log.csv"),
        "nan_iou": lambda d: (d / "log.csv").write_text(with_nan_val_iou((good / "log.csv").read_text())),
        "bad_yaml": lambda d: (d / "config.yml").write_text("arch: [UNet\n"),
        "bad_metrics": lambda d: None,
    }
    for name, breaker in breakers.items():
        d = tmp_path / "models" / name
        os.makedirs(d)
        for f in ("config.yml", "log.csv"):
            (d / f).write_bytes((good / f).read_bytes())
        if name == "log_folder":
            os.remove(d / "log.csv")
        breaker(d)
    os.makedirs(tmp_path / "outputs" / "bad_metrics")
    (tmp_path / "outputs" / "bad_metrics" / "metrics.csv").write_bytes(b"id,iou_0\nimg,\xff\xff\n")
    return breakers


@pytest.mark.e2e
def test_broken_runs_are_named_in_the_table_and_the_others_shown(tmp_path, monkeypatch, capsys):
    broken_runs(tmp_path, monkeypatch, capsys)
    code, out, err = run_main(compare.main, [], tmp_path, monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    lines = out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:8]}
    assert "1/1" in rows["good"] and "1/1" in rows["bad_metrics"] and rows["bad_metrics"].split()[-2] == "-"
    for name, says in (("latin1", "is not UTF-8 text"), ("no_val_iou", "has no val_iou column"),
                       ("log_folder", "log.csv (its log of epochs) is a folder, not a file"), ("nan_iou", "val_iou is 'nan', not a number"),
                       ("bad_yaml", "is not valid YAML")):
        assert "cannot be read" in rows[name]
        assert any(line.startswith(f"{name}: ") and says in line for line in lines[8:]), (name, out)


@pytest.mark.e2e
def test_plot_into_a_missing_folder_and_all_runs_broken(tmp_path, monkeypatch, capsys):
    broken_runs(tmp_path, monkeypatch, capsys)
    code, _, err = run_main(compare.main, ["--plot", "nowhere/runs.png"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "the folder nowhere does not exist" in err and not os.path.exists(tmp_path / "nowhere")
    code, out, err = run_main(compare.main, ["latin1", "bad_yaml", "--plot", "runs.png"], tmp_path, monkeypatch,
                              capsys)
    assert code == 2 and "none of the 2 run(s) can be read" in err and "latin1: " in out
    assert not os.path.exists(tmp_path / "runs.png")
    code, _, err = run_main(compare.main, ["good", "latin1", "--plot", "runs.png"], tmp_path, monkeypatch, capsys)
    assert code == 0 and os.path.getsize(tmp_path / "runs.png") > 1000, err     # the readable run is plotted
