"""--init (pretrained.py): a run starting from a run, a model.pth or a BioImage.IO zip; the network and normalisation
following it, the first convolution and the final layer adapted, mismatches and bad files refused, the fine-tuning
defaults, and where the run started recorded."""
import hashlib
import json
import math
import zipfile

import numpy as np
import pytest
import torch

import checkpoint
import config
import export
import pretrained
import runtime
import train
from archs import FIRST_CONV, build_model, is_head
from conftest import make_data, run_main
from predictor import Predictor, describe
from utils import UserError, save_yaml

NET = {"arch": "UNet", "base_channels": 4, "deep_supervision": False, "input_channels": 3, "num_classes": 1}
SMALL = ["--epochs", "1", "-b", "4", "--input_w", "32", "--input_h", "32", "--num_workers", "0", "--device", "cpu"]


def make_run(runs, name, seed=1, files=("config.yml", "model.json"), **settings):
    """A run folder as train.py leaves it (config.yml, model.json, model.pth), with random weights (BatchNorm statistics
    too, so that every tensor tells the source's from a fresh network's) -> its state_dict."""
    cfg = config.check({**config.DEFAULTS, **NET, "name": name, "normalize": "imagenet", **settings})
    torch.manual_seed(seed)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in build_model(cfg).state_dict().items()}
    folder = runs / name
    folder.mkdir(parents=True)
    torch.save(state, folder / "model.pth")
    if "config.yml" in files:
        save_yaml(str(folder / "config.yml"), cfg)
    if "model.json" in files:
        (folder / "model.json").write_text(json.dumps(describe(cfg, {"uint8"})))
    return state


def resolve(tmp_path, argv):
    return train.resolve(["--runs_dir", str(tmp_path / "models"), "--data_dir", str(tmp_path / "inputs"), *argv])


def same(a, b):
    return a.shape == b.shape and torch.equal(a.float().cpu(), b.float().cpu())


def test_a_model_pth_with_its_model_json_is_read_whole(tmp_path):
    state = make_run(tmp_path, "loose", files=("model.json",), normalize="percentile", norm_pmax=99.5)
    source = pretrained.read_source(str(tmp_path / "loose" / "model.pth"), str(tmp_path / "models"))
    assert all(same(source.state[k], v) for k, v in state.items())
    assert source.settings["normalize"] == "percentile" and source.settings["norm_pmax"] == 99.5
    assert source.settings_path.endswith("model.json") and source.run is None
    assert source.sha256 == hashlib.sha256((tmp_path / "loose" / "model.pth").read_bytes()).hexdigest()


def test_a_model_pth_alone_is_described_by_its_tensors(tmp_path):
    cfg = {**NET, "arch": "NestedUNet", "deep_supervision": True, "num_classes": 2, "input_channels": 1}
    torch.save(build_model(cfg).state_dict(), tmp_path / "alone.pth")
    source = pretrained.read_source(str(tmp_path / "alone.pth"), str(tmp_path / "models"))
    assert {k: source.settings[k] for k in cfg} == cfg
    assert "normalize" not in source.settings and "normalisation unknown" in source.summary()


def test_a_run_by_name_gives_the_network_its_normalisation_and_provenance(tmp_path):
    state = make_run(tmp_path / "models", "cells", arch="NestedUNet", base_channels=8, per_image_norm=True,
                     dataset="dsb2018_96")
    cfg, run = resolve(tmp_path, ["--init", "cells", "--name", "ft"] + SMALL)
    assert (cfg["arch"], cfg["base_channels"], cfg["per_image_norm"], cfg["normalize"]) == ("NestedUNet", 8, True,
                                                                                             "imagenet")
    source = run["init"]
    assert source.run == "cells" and source.dataset == "dsb2018_96"
    assert same(source.state[FIRST_CONV], state[FIRST_CONV])
    assert "init: " in run["plan_lines"][0] and "run cells, data set dsb2018_96" in run["plan_lines"][0]
    assert run["sources"]["arch"].startswith("the file ")     # --plan says 'set by the file ...'


@pytest.mark.parametrize("argv, differs", [
    (["--arch", "UNet"], "arch UNet from the command line (--arch)"),
    (["--base_channels", "16"], "base_channels 16 from the command line (--base_channels)"),
    (["--deep_supervision"], "deep_supervision true"),
])
def test_another_network_or_width_is_refused_naming_what_differs(tmp_path, argv, differs):
    make_run(tmp_path / "models", "cells", arch="NestedUNet", base_channels=8)
    with pytest.raises(UserError, match=r"--init cells: the model is a network with") as e:
        resolve(tmp_path, ["--init", "cells"] + argv)
    assert differs in str(e.value) and "config.yml" in str(e.value)
    cfg, _ = resolve(tmp_path, ["--init", "cells", "--arch", "NestedUNet", "--base_channels", "8"])   # the same: fine
    assert cfg["arch"] == "NestedUNet"


def test_the_users_normalisation_is_kept_with_a_warning(tmp_path):
    make_run(tmp_path / "models", "cells", normalize="percentile")
    with pytest.warns(UserWarning, match="starts far from its optimum"):
        cfg, _ = resolve(tmp_path, ["--init", "cells", "--normalize", "imagenet"])
    assert cfg["normalize"] == "imagenet"
    assert resolve(tmp_path, ["--init", "cells"])[0]["normalize"] == "percentile"


def test_fine_tuning_lowers_the_rate_and_the_planned_epochs_the_user_did_not_set(tmp_path):
    make_run(tmp_path / "models", "cells")
    make_data(tmp_path / "inputs", "tiny", n=12)
    cfg, run = resolve(tmp_path, ["--init", "cells", "--dataset", "tiny", "--plan", "auto"])
    planned, _ = resolve(tmp_path, ["--dataset", "tiny", "--plan", "auto"])
    assert cfg["lr"] == pytest.approx(planned["lr"] / 10) and cfg["min_lr"] == pytest.approx(planned["min_lr"] / 10)
    assert cfg["epochs"] == math.ceil(planned["epochs"] / 4)
    assert any("fine-tuning from --init: lr" in line for line in run["plan_lines"])
    given, _ = resolve(tmp_path, ["--init", "cells", "--dataset", "tiny", "--plan", "auto", "--lr", "0.01",
                                  "--epochs", "7"])
    assert (given["lr"], given["epochs"]) == (0.01, 7)
    assert resolve(tmp_path, ["--init", "cells"])[0]["lr"] == pytest.approx(config.DEFAULTS["lr"] / 10)


def test_weights_larger_than_their_network_are_refused_before_they_are_read(tmp_path, monkeypatch):
    make_run(tmp_path, "lying", files=("model.json",))                 # model.json: base_channels 4 ...
    torch.save(build_model({**NET, "base_channels": 16}).state_dict(), tmp_path / "lying" / "model.pth")   # ... 16
    monkeypatch.setattr(checkpoint, "load", lambda *a: pytest.fail("the file was read"))
    with pytest.raises(UserError, match=r"--init .*lying/model.pth: .*model.pth is \d+\.\d MB, but the network"):
        pretrained.read_source(str(tmp_path / "lying" / "model.pth"), "models")


def test_weights_of_another_network_than_described_are_refused(tmp_path):
    make_run(tmp_path, "other", files=("model.json",), num_classes=3)
    torch.save(build_model(NET).state_dict(), tmp_path / "other" / "model.pth")      # 1 class, not 3
    with pytest.raises(UserError, match=r"final.bias is \(1,\) in the file, \(3,\) in the settings"):
        pretrained.read_source(str(tmp_path / "other" / "model.pth"), "models")


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "is not a checkpoint this toolkit can load safely"),
    ("linear", "holds no U-Net / UNet\\+\\+ weights"),
    ("tensor", "does not hold a network's weights"),
])
def test_a_file_that_is_no_model_is_one_message_naming_it(tmp_path, content, message):
    path = tmp_path / "thing.pth"
    if content == "linear":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        pretrained.read_source(str(path), "models")
    assert str(path) in str(e.value)


def test_a_name_that_is_nothing_lists_the_runs(tmp_path):
    make_run(tmp_path / "models", "cells")
    with pytest.raises(UserError, match=r"--init cels: there is no run .*models/cels \(runs there: cells\)"):
        resolve(tmp_path, ["--init", "cels"])


def test_adapted_weights_a_new_head_and_a_summed_first_convolution(tmp_path):
    state = make_run(tmp_path / "models", "cells")
    make_data(tmp_path / "inputs", "three", num_classes=3, exclusive=True, channels=1)
    argv = ["--dataset", "three", "--num_classes", "3", "--input_channels", "1", "--name", "ft"] + SMALL
    cfg, run = resolve(tmp_path, argv + ["--init", "cells"])
    engine, _, start = train.build(cfg, runtime.for_training(cfg), None, run["init"])
    torch.manual_seed(cfg["seed"])              # what the run's seed builds: its final layer is the run's new one
    fresh = build_model(cfg).state_dict()
    got = engine.model.state_dict()
    assert same(got[FIRST_CONV], state[FIRST_CONV].sum(1, keepdim=True))
    assert all(same(got[k], fresh[k]) for k in got if is_head(k)) and got["final.weight"].shape[0] == 3
    assert all(same(got[k], state[k]) for k in got if not is_head(k) and k != FIRST_CONV)
    assert start["model"]["init"]["run"] == "cells" and start["model"]["init"]["sha256"] == run["init"].sha256


def write_package(path, predictor, weights=None):
    """A package zip with pytorch_state_dict weights, as export.py wrote them before it kept TorchScript only (and as
    other tools write them): rdf.yaml's preprocessing from bioimageio_package's own functions -> its path."""
    import yaml

    import bioimageio_package as bp
    model = bp.network_part(predictor)
    d = predictor.description
    kwargs = {"network": {**bp.network_settings(d), "deep_supervision": bool(d["deep_supervision"])},
              "class_mode": d["class_mode"], "per_image_eps": bp.STANDARDIZE_EPS if d["normalize"]["per_image"] else None}
    torch.save(model.state_dict() if weights is None else weights, path.parent / "weights.pt")
    data = (path.parent / "weights.pt").read_bytes()
    rdf = {"type": "model", "inputs": [{"id": "raw", "preprocessing": bp.preprocessing(predictor.description)}],
           "weights": {"pytorch_state_dict": {
               "source": "weights.pt", "sha256": hashlib.sha256(data if weights is None else b"").hexdigest(),
               "architecture": {"source": "archs.py", "callable": "Probabilities", "kwargs": kwargs}}}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("rdf.yaml", yaml.safe_dump(rdf))
        z.writestr("weights.pt", data)
    return str(path)


def test_a_package_zip_gives_its_weights_network_and_normalisation(tmp_path):
    cfg = {**config.DEFAULTS, **NET, "normalize": "percentile", "norm_pmin": 2.0, "per_image_norm": True}
    torch.manual_seed(3)
    predictor = Predictor.build(describe(cfg, {"uint16"})).eval()
    source = pretrained.read_source(write_package(tmp_path / "package.zip", predictor), "models")
    assert all(same(source.state[k], v) for k, v in predictor.network.state_dict().items())
    assert {k: source.settings[k] for k in (*NET, "normalize", "norm_pmin", "norm_pmax", "per_image_norm")} == {
        **NET, "normalize": "percentile", "norm_pmin": 2.0, "norm_pmax": 99.8, "per_image_norm": True}
    changed = {f"network.{k}": v + 1 for k, v in predictor.network.state_dict().items()}   # not what rdf.yaml hashed
    with pytest.raises(UserError, match="weights.pt does not have the sha256 its rdf.yaml gives"):
        pretrained.read_source(write_package(tmp_path / "changed.zip", predictor, changed), "models")


# End to end: a trained run, its export, and runs that start from them.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run 'src' (UNet, base_channels 4, Adam, on the 8-bit RGB set 'tiny'), and a grey data set."""
    root = tmp_path_factory.mktemp("init")
    make_data(root / "inputs", "tiny")
    make_data(root / "inputs", "grey", channels=1)
    argv = ["--dataset", "tiny", "--arch", "UNet", "--base_channels", "4", "--name", "src", "--optimizer", "Adam"]
    quietly(train.main, argv + SMALL, root)
    return root


def quietly(main, argv, cwd):
    """An entry script's main() from a module fixture (which cannot take capsys: the output goes to the log)."""
    class NoCapture:
        @staticmethod
        def readouterr():
            return "", ""
    mp = pytest.MonkeyPatch()
    code, _, err = run_main(main, argv, cwd, mp, NoCapture())
    mp.undo()
    assert code == 0, err


@pytest.fixture(scope="module")
def exported(trained):
    """The trained run, exported by export.py (models/src/export/: model.pth, model.json, bioimageio.zip)."""
    quietly(export.main, ["--name", "src"], trained)
    return trained


@pytest.mark.e2e
@pytest.mark.slow(seconds=30)
def test_a_run_starts_from_a_run_a_folder_a_model_pth_and_an_export_zip(exported, monkeypatch):
    monkeypatch.chdir(exported)
    source = torch.load(exported / "models" / "src" / "model.pth", weights_only=True)
    for given in ("src", "models/src", "models/src/model.pth", "models/src/export/bioimageio.zip"):
        cfg, run = train.resolve(["--init", given, "--dataset", "tiny", "--name", "ft"] + SMALL)
        assert (cfg["arch"], cfg["base_channels"]) == ("UNet", 4)        # followed, not the defaults (NestedUNet, 32)
        engine, _, start = train.build(cfg, runtime.for_training(cfg), None, run["init"])
        assert all(same(engine.model.state_dict()[k], v) for k, v in source.items()), given
        assert start["model"]["init"]["given"] == given


@pytest.mark.e2e
def test_a_fine_tuned_run_records_where_it_started_and_resumes_without_reading_it_again(trained, monkeypatch,
                                                                                        capsys):
    argv = ["--init", "src", "--dataset", "grey", "--input_channels", "1", "--name", "ft_grey"] + SMALL
    code, out, err = run_main(train.main, argv, trained, monkeypatch, capsys)
    assert code == 0, err
    assert "the first convolution adapted from 3 to 1 input channel(s) (summed over them)" in out
    assert "fine-tuning from --init: lr 0.0001" in out
    folder = trained / "models" / "ft_grey"
    assert config.load_run_config(str(folder / "config.yml"))["init"] == "src"
    recorded = json.loads((folder / "model.json").read_text())["init"]
    assert recorded["sha256"] == hashlib.sha256((trained / "models" / "src" / "model.pth").read_bytes()).hexdigest()
    assert (recorded["run"], recorded["dataset"]) == ("src", "tiny")
    monkeypatch.setattr(pretrained, "read_source", lambda *a: pytest.fail("the source was read again"))
    code, out, err = run_main(train.main, ["--name", "ft_grey", "--resume", "--epochs", "2"], trained, monkeypatch,
                              capsys)
    assert code == 0, err
    assert "resuming after epoch 1" in out and "init: weights from" not in out
    assert json.loads((folder / "model.json").read_text())["init"] == recorded
    rows = (folder / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and np.isfinite(float(rows[-1].split(",")[1]))
