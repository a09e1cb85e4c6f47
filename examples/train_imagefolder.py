"""Train a torchvision model with N:M sparsity (SpRe or SR-STE) on an ImageFolder, then deploy it.

The recipe is the paper's (docs/method.md §5): SGD momentum 0.9, LR 0.1 x batch / 256, cosine schedule
after a linear warm-up, label smoothing 0.1, weight decay 1e-4, from scratch. The data folder holds
`train/` and `val/`, each with one sub-folder per class (torchvision.datasets.ImageFolder).

`--pretrained torchvision` starts from torchvision's weights for `--arch` (from the torch hub cache,
downloaded there if missing), `--pretrained PATH` from a dense state_dict of the same architecture (or a
file holding one under "model"); a classifier whose shape differs (another class count) keeps its fresh
initialisation; `--permute` reorders its channels first so that N:M keeps more of its weights
(spre_fx.prepare(..., permute=True)). The SpRe branches start silent, spre_fx's default (docs/method.md
§6; docs/training.md, "Fine-tuning from a dense checkpoint"); `--branch-init paper` gives the paper's
initialisation instead.

    PYTHONPATH=. .venv/bin/python examples/train_imagefolder.py --data ~/imagenette --epochs 120
    PYTHONPATH=. .venv/bin/python examples/train_imagefolder.py --data DIR \
        --resume out/imagefolder/checkpoint.pt

Each epoch ends with `checkpoint.pt` (model, optimizer, LR schedule and mask scheduler state,
loadable with `torch.load(..., weights_only=True)`); the run ends with `deployed.pt`, the
converted model (SpRe branches and BatchNorms folded, exactly N:M), rebuilt by `load_deployed`
from a freshly built torchvision model with `spre_fx.deployed_like` (no prepare, no training code).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms as T

import spre_fx

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, found {text!r}") from None
    return n, m


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with train/ and val/ ImageFolders")
    p.add_argument("--arch", default="resnet18", help="torchvision model name (torchvision.models.get_model)")
    p.add_argument("--nm", type=parse_nm, default=(2, 4), help="N:M pattern, e.g. 2:4 or 1:4")
    p.add_argument("--no-spre", action="store_true", help="plain N:M with SR-STE (no SpRe branch)")
    p.add_argument("--pretrained", metavar="PATH|torchvision",
                   help="start from dense weights: torchvision's for --arch, or a state_dict file")
    p.add_argument("--permute", action="store_true",
                   help="reorder channels before pruning so that N:M keeps more |w| (for --pretrained)")
    p.add_argument("--branch-init", choices=("silent", "paper"), default="silent",
                   help="SpRe branch start: silent (BN γ = 0, step 0 is the N:M projection) or the paper's")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate at batch 256 (scaled linearly)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/imagefolder"), help="output folder")
    p.add_argument("--resume", type=Path, help="checkpoint.pt to continue from")
    return p.parse_args(argv)


def loaders(args: argparse.Namespace):
    size = args.image_size
    normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    val_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), *normalize])
    train_set = torchvision.datasets.ImageFolder(args.data / "train", train_tf)
    val_set = torchvision.datasets.ImageFolder(args.data / "val", val_tf)
    if train_set.classes != val_set.classes:
        raise SystemExit(f"train/ and val/ have different classes: {train_set.classes} vs {val_set.classes}")
    common = dict(batch_size=args.batch_size, num_workers=args.workers,
                  pin_memory=args.device.startswith("cuda"), persistent_workers=args.workers > 0)
    train = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch_size,
                                        **common)
    val = torch.utils.data.DataLoader(val_set, shuffle=False, **common)
    return train, val, train_set.classes


def build(arch: str, num_classes: int, nm: tuple[int, int], spre: bool, pretrained: str | Path | None = None,
          silent_branch: bool = True, permute: bool = False) -> nn.Module:
    """The torchvision model, prepared: N:M everywhere but the stem, SpRe branches on k×k conv→BN.

    pretrained: "torchvision" (its default weights for `arch`) or a state_dict file, loaded into the
    dense model before `prepare` (load_pretrained). permute: channel permutation before pruning."""
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if pretrained is not None:
        load_pretrained(model, arch, pretrained)
    return spre_fx.prepare(model, nm=nm, spre=spre, silent_branch=silent_branch, permute=permute)


def load_pretrained(model: nn.Module, arch: str, source: str | Path) -> list[str]:
    """Load dense weights into `model` (before prepare): torchvision's for `arch` or a state_dict file.

    Every parameter and buffer must be in the file under the model's own name; those whose shape
    differs (a classifier for another class count) keep their initialisation and are returned."""
    if str(source) == "torchvision":
        state = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=True)
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise SystemExit(f"--pretrained {source}: expected a dense {arch} state_dict; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(missing)} and {len(unexpected)} names): pass "
                         "weights of the same architecture, saved before spre_fx.prepare")
    reshaped = [k for k in own if state[k].shape != own[k].shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)
    fresh = f"; {', '.join(reshaped)} of another shape kept their initialisation" if reshaped else ""
    print(f"loaded dense weights from {source}: {len(own) - len(reshaped)} tensors{fresh}")
    return reshaped


def load_deployed(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Rebuild the deployed model saved by this script: the torchvision model as built (no
    prepare), turned into its deployed form by `spre_fx.deployed_like` with the saved weights."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = torchvision.models.get_model(ckpt["arch"], weights=None, num_classes=len(ckpt["classes"]))
    return spre_fx.deployed_like(model, ckpt["model"], nm=tuple(ckpt["nm"])).eval()


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool) -> float:
    model.eval()
    correct = seen = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            correct += int((model(images).argmax(1) == labels).sum())
        seen += len(labels)
    return correct / max(1, seen)


def save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a crash mid-save never leaves a broken checkpoint


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    train_loader, val_loader, classes = loaders(args)

    model = build(args.arch, len(classes), args.nm, not args.no_spre, args.pretrained,
                  args.branch_init == "silent", args.permute).to(device)
    rep = spre_fx.report(model)
    print(f"{args.arch} {args.nm[0]}:{args.nm[1]}: {rep.count('spre')} spre, {rep.count('nm')} nm, "
          f"{rep.count('dense')} dense layers; {len(classes)} classes, {len(train_loader.dataset)} train / "
          f"{len(val_loader.dataset)} val images")

    lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    steps = len(train_loader)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.warmup_epochs * steps, args.epochs * steps)
    )
    masks = spre_fx.MaskScheduler(model, optimizer)  # N:M masks (and SpRe's S) move after every step
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    start_epoch = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_schedule.load_state_dict(ckpt["lr_schedule"])
        masks.load_state_dict(ckpt["mask_scheduler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])  # the same shuffles and crops as an uninterrupted run
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_epoch = ckpt["epoch"]
        print(f"resumed from {args.resume} at epoch {start_epoch}")

    checkpoint = args.out / "checkpoint.pt"
    for epoch in range(start_epoch, args.epochs):
        model.train()
        tic, loss_sum, seen = time.perf_counter(), 0.0, 0
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # the MaskScheduler's hook updates the masks right after
            lr_schedule.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        acc = evaluate(model, val_loader, device, args.amp)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss_sum / max(1, seen):.4f}  val top-1 {acc:.2%}  "
              f"lr {lr_schedule.get_last_lr()[0]:.4g}  {time.perf_counter() - tic:.0f} s", flush=True)
        save({
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_schedule": lr_schedule.state_dict(),
            "mask_scheduler": masks.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "args": {k: str(v) for k, v in vars(args).items()},
        }, checkpoint)

    # Deploy: one N:M conv per SpRe pair, BatchNorms folded; verify it equals the trained model.
    masks.remove()
    model.eval()
    deployed = spre_fx.convert(model)
    images, _ = next(iter(val_loader))
    result = spre_fx.verify(model, deployed, images[:8].to(device))
    acc = evaluate(deployed, val_loader, device, args.amp)
    print(spre_fx.report(deployed))
    print(f"deployed: val top-1 {acc:.2%}; verify: relative output error {result.output_error:.2e}, "
          f"{sum(result.nm_violations.values())} N:M violations")
    deployed_path = args.out / "deployed.pt"
    save({
        "arch": args.arch,
        "nm": list(args.nm),
        "spre": not args.no_spre,
        "classes": classes,
        "model": deployed.state_dict(),
        "val_top1": acc,
    }, deployed_path)
    print(f"saved {checkpoint} and {deployed_path}")
    return {"checkpoint": checkpoint, "deployed": deployed_path, "val_top1": acc,
            "output_error": result.output_error}


if __name__ == "__main__":
    main()
