"""Trains keras-t2t and the official PyTorch T2T-ViT side by side, on the same data and recipe.

    python benchmarks/fidelity.py --official_dir=path/to/T2T-ViT --seeds=0,1,2

The official code is a checkout of https://github.com/yitu-opensource/T2T-ViT (not part of
this project; it needs torch). Without --official_dir only ours is trained.

Data: a procedural 10-class image set made here (shapes of 10 kinds, random colors, sizes,
positions and tilts over blotchy, noisy backgrounds with a small distractor shape; JPEG
TFRecords), so that it needs nothing from the network. Recipe, for both: T2T-ViT-7 at
64x64, batch 64, AdamW lr 1e-3 (betas 0.9/0.999, eps 1e-8, weight decay 0.05 without decay
on biases, norms and the class token), per-step cosine to 1e-5 with no warmup, random-resized
crop (scale 0.25-1) and flip, label smoothing 0.1, drop path 0.1, the performer's dropout.

Ours is `training.trainer.Trainer`, the product's loop. The official model is trained by a
plain PyTorch loop fed by our input pipeline (the same augmentation code, not the same draws),
with `torch.optim.AdamW` and the official parameter groups: what differs is the model code,
its initialization, the gradients and the optimizer, which is what this compares.
Both are evaluated on the same held-out images with the evaluation preprocessing. Prints the
top-1 of each seed and the means.
"""

import argparse
import math
import os
import sys
import tempfile
import time
import types

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

CLASSES = 10


def make_images(count, size, seed):
    """`count` uint8 images `(size, size, 3)` and labels: class k is shape k of 10."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    images, labels = [], []
    for i in range(count):
        label = i % CLASSES
        background = rng.uniform(40, 215, 3)
        image = np.ones((size, size, 3), np.float32) * background
        image += rng.normal(0, 1, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1) * 10
        for j, kind in enumerate([label, rng.integers(0, CLASSES)]):  # + 1 small distractor
            main = j == 0
            scale = rng.uniform(0.22, 0.36) * size if main else rng.uniform(0.06, 0.1) * size
            cy, cx = rng.uniform(0.35, 0.65, 2) * size if main else rng.uniform(0, 1, 2) * size
            angle = rng.uniform(-0.5, 0.5)
            u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / scale
            v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / scale
            r = np.hypot(u, v)
            mask = [
                r < 1,  # disc
                (np.abs(u) < 1) & (np.abs(v) < 1),  # square
                (v > -0.8) & (v < 1.2 - 1.6 * np.abs(u)),  # triangle
                ((np.abs(u) < 0.3) & (np.abs(v) < 1)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1)),
                (r < 1) & (r > 0.6),  # ring
                (np.abs(u) < 1.2) & (np.abs(v) < 0.45),  # bar
                (r < 1) & (v > 0),  # half disc
                (r < 1) & (np.cos(6 * np.arctan2(v, u)) > 0),  # star-like wheel
                (np.abs(u) < 1) & (np.abs(v) < 1) & ~((np.abs(u) < 0.5) & (np.abs(v) < 0.5)),
                (r < 1) & (np.sin(3 * np.pi * u) > 0),  # striped disc
            ][kind]
            color = rng.uniform(0, 255, 3)
            if np.abs(color - background).max() < 60:
                color = 255 - color
            alpha = 1.0 if main else 0.5
            image[mask] = (1 - alpha) * image[mask] + alpha * color
        image += rng.normal(0, 10, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        labels.append(label)
    return np.stack(images), np.array(labels)


def write_records(folder, train_per_class, val_per_class, size):
    from training import build_tfrecords

    for split, per_class, seed in (("train", train_per_class, 0), ("validation", val_per_class, 1)):
        images, labels = make_images(per_class * CLASSES, size, seed)
        examples = (
            build_tfrecords.make_example(
                build_tfrecords.to_jpeg(image), int(label) + 1, str(label), f"{i}.jpg", size, size
            )
            for i, (image, label) in enumerate(zip(images, labels))
        )
        build_tfrecords.write_shards(examples, folder, split, 2)


def recipe(args, data_dir, model_dir, seed):
    from training import data
    from training.config import Config

    return Config(
        model="t2t_vit_7",
        data_dir=data_dir,
        model_dir=model_dir,
        image_size=args.image_size,
        num_classes=CLASSES,
        batch_size=args.batch_size,
        epochs=args.epochs,
        warmup_epochs=0,
        cooldown_epochs=0,
        learning_rate=args.learning_rate * 512 / args.batch_size,
        min_lr=1e-5,
        weight_decay=0.05,
        drop_path_rate=0.1,
        ema_decay=0.999,
        eval_every_epochs=args.epochs,
        steps_per_loop=10,
        jit_compile=True,
        seed=seed,
        crop_pct=1.0,
        eval_batch_size=100,
        deterministic_data=True,
        aug=data.Augmentation(
            crop_scale_min=0.25,
            hflip=True,
            randaugment_ops=0,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            label_smoothing=0.1,
            random_erasing=0.0,
        ),
    )


def train_ours(config):
    from training import trainer

    start = time.time()
    results = trainer.Trainer(config).run()
    return results["top1"], results["ema_top1"], time.time() - start


def import_official(official_dir):
    """The official `models` package; timm supplies it only 4 names, given here (timm's
    current releases import torchvision, which a CPU-only torch may lack)."""
    import torch

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    class DropPath(torch.nn.Module):  # timm's drop_path, per sample
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob or 0.0

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1 - self.drop_prob
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            mask = torch.floor(keep + torch.rand(shape, dtype=x.dtype, device=x.device))
            return x.div(keep) * mask

    timm = types.ModuleType("timm")
    modules = {
        "timm": timm,
        "timm.models": types.ModuleType("timm.models"),
        "timm.models.helpers": types.ModuleType("timm.models.helpers"),
        "timm.models.registry": types.ModuleType("timm.models.registry"),
        "timm.models.layers": types.ModuleType("timm.models.layers"),
    }
    modules["timm.models.helpers"].load_pretrained = None
    modules["timm.models.registry"].register_model = lambda f: f
    modules["timm.models.layers"].trunc_normal_ = trunc_normal_
    modules["timm.models.layers"].DropPath = DropPath
    sys.modules.update(modules)
    sys.path.insert(0, official_dir)
    import models

    return models


def train_official(models, config, seed, threads):
    import tensorflow as tf
    import torch

    from keras_t2t.imagenet import preprocess_input
    from training import data

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = models.t2t_vit_7(
        num_classes=CLASSES, img_size=config.image_size, drop_path_rate=config.drop_path_rate
    )
    no_decay = {"cls_token"}
    groups = [
        dict(
            params=[
                p
                for n, p in model.named_parameters()
                if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias") or n in no_decay)
            ],
            weight_decay=0.0,
        ),
        dict(
            params=[
                p
                for n, p in model.named_parameters()
                if p.requires_grad and not (p.ndim <= 1 or n.endswith(".bias") or n in no_decay)
            ],
            weight_decay=config.weight_decay,
        ),
    ]
    peak = config.learning_rate * config.batch_size / 512
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), eps=1e-8)
    files = data.list_files(config.data_dir, "train")
    examples = sum(1 for _ in tf.data.TFRecordDataset(files))
    steps_per_epoch = examples // config.batch_size
    total = config.epochs * steps_per_epoch
    batches = data.train_dataset(
        files,
        config.batch_size,
        config.image_size,
        CLASSES,
        config.aug,
        seed=seed,
        deterministic=True,
    )

    def prepare(images):
        return torch.from_numpy(preprocess_input(images.numpy(), "channels_last")).permute(
            0, 3, 1, 2
        )

    start = time.time()
    model.train()
    for step, (images, targets) in enumerate(batches.take(total)):
        lr = config.min_lr + (peak - config.min_lr) * 0.5 * (1 + math.cos(math.pi * step / total))
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(prepare(images))
        target = torch.from_numpy(targets.numpy())
        loss = torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    correct = count = 0
    evaluation = data.eval_dataset(
        data.list_files(config.data_dir, "validation"),
        100,
        config.image_size,
        CLASSES,
        crop_pct=config.crop_pct,
    )
    with torch.no_grad():
        for images, labels, mask in evaluation:
            predicted = model(prepare(images)).argmax(-1).numpy()
            keep = mask.numpy() > 0
            correct += int(np.sum((predicted == labels.numpy())[keep]))
            count += int(keep.sum())
    return correct / count, time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official_dir", help="checkout of yitu-opensource/T2T-ViT")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train_per_class", type=int, default=120)
    parser.add_argument("--val_per_class", type=int, default=40)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="at --batch_size")
    parser.add_argument("--which", default="ours,official", help="ours, official or both")
    parser.add_argument("--data_dir", help="keep the generated TFRecords here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    work = tempfile.mkdtemp(prefix="t2t_fidelity_")
    data_dir = args.data_dir or os.path.join(work, "records")
    if not os.path.exists(os.path.join(data_dir, "manifest-train.json")):
        write_records(data_dir, args.train_per_class, args.val_per_class, args.image_size)
    which = set(args.which.split(","))
    official = import_official(args.official_dir) if args.official_dir else None
    if official is None:
        which.discard("official")
    seeds = [int(s) for s in args.seeds.split(",")]
    scores = {"ours": [], "ours_ema": [], "official": []}
    print(
        f"T2T-ViT-7, {CLASSES} classes x {args.train_per_class} images at {args.image_size}px, "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW {args.learning_rate}"
    )
    for seed in seeds:
        config = recipe(args, data_dir, os.path.join(work, f"ours_{seed}"), seed)
        if "ours" in which:
            top1, ema_top1, seconds = train_ours(config)
            scores["ours"].append(top1)
            scores["ours_ema"].append(ema_top1)
            print(
                f"seed {seed} keras-t2t top-1 {top1:.4f} (EMA {ema_top1:.4f}) {seconds:.0f}s",
                flush=True,
            )
        if "official" in which:
            top1, seconds = train_official(official, config, seed, os.cpu_count() or 1)
            scores["official"].append(top1)
            print(f"seed {seed} official  top-1 {top1:.4f} {seconds:.0f}s", flush=True)
    for name, values in scores.items():
        if values:
            print(
                f"{name:9s} mean {np.mean(values):.4f} std {np.std(values):.4f} "
                f"over {len(values)}: {', '.join(f'{v:.4f}' for v in values)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
