"""Train the project's point-cloud encoder (PointNet) on generated scenes.

    python -m train.point_encoder [--epochs 10] [--out assets/point_encoder.safetensors]

Nothing pretrained for point clouds ships in any package, so the encoder learns what the
questions ask about: heads for the object count, which shapes and which colours are present, and
which shape has which colour. Only the PointNet (not the heads) is used as the encoder; the
heads' test accuracies are printed and stored in the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from core.encoders.points import N_POINTS, WEIGHTS, PointHeads, PointNet, normalize
from core.files import atomic_path
from train.pointclouds import COLORS, SHAPES, SPLITS, scene

N_SHAPES, N_COLORS = len(SHAPES), len(COLORS)


def targets(objects: list[dict]) -> np.ndarray:
    """count (1 value, 0..2) | shapes present | colours present | shape x colour pairs."""
    shapes = np.zeros(N_SHAPES)
    colors = np.zeros(N_COLORS)
    pairs = np.zeros((N_SHAPES, N_COLORS))
    for o in objects:
        s, c = SHAPES.index(o["shape"]), list(COLORS).index(o["color"])
        shapes[s] = colors[c] = pairs[s, c] = 1
    return np.concatenate([[len(objects) - 1], shapes, colors, pairs.ravel()]).astype(np.float32)


def split_data(split: str, n: int, seed: int):
    clouds, ys = [], []
    for i in range(n):
        pts, objects = scene(split, i)
        clouds.append(normalize(pts, N_POINTS, seed=seed + i))
        ys.append(targets(objects))
    return torch.from_numpy(np.stack(clouds)), torch.from_numpy(np.stack(ys))


def losses_and_hits(net, heads, x, y):
    count_logits, multi_logits = heads(net(x))
    loss = F.cross_entropy(count_logits, y[:, 0].long()) + F.binary_cross_entropy_with_logits(multi_logits, y[:, 1:])
    count_ok = count_logits.argmax(-1) == y[:, 0].long()
    multi_ok = (multi_logits > 0) == (y[:, 1:] > 0.5)
    return loss, count_ok, multi_ok


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.point_encoder", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train", type=int, default=SPLITS["train"])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default=str(WEIGHTS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    test_x, test_y = split_data("test", SPLITS["test"], seed=10**6)
    net, heads = PointNet(width=args.width), PointHeads(args.width, N_SHAPES, N_COLORS)
    params = [*net.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (args.train // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        x, y = split_data("train", args.train, seed=epoch * 10**5)  # new point subsets each epoch
        order = torch.randperm(len(x))
        net.train()
        total = 0.0
        for b in range(len(x) // args.batch_size):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            loss, _, _ = losses_and_hits(net, heads, x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        report = evaluate(net, heads, test_x, test_y)
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / (len(x) // args.batch_size):.4f} test {report} "
              f"({time.time() - t0:.0f} s)", flush=True)
    state = dict(net.state_dict())
    state.update({f"head.{k}": v for k, v in heads.state_dict().items()})
    from safetensors.torch import save_file
    with atomic_path(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp,
                  metadata={"point_encoder": json.dumps({"width": args.width, "points": N_POINTS, "epochs": args.epochs,
                                                         "shapes": list(SHAPES), "colors": list(COLORS),
                                                         "test": report, "command": "python -m train.point_encoder"})})
    print(f"wrote {args.out}")


@torch.no_grad()
def evaluate(net, heads, x, y) -> dict:
    net.eval()
    hits = [losses_and_hits(net, heads, x[i:i + 64], y[i:i + 64])[1:] for i in range(0, len(x), 64)]
    count_ok, multi_ok = torch.cat([h[0] for h in hits]), torch.cat([h[1] for h in hits])
    shapes = multi_ok[:, :N_SHAPES].all(1)
    colors = multi_ok[:, N_SHAPES:N_SHAPES + N_COLORS].all(1)
    pairs = multi_ok[:, N_SHAPES + N_COLORS:].all(1)
    return {"count": round(count_ok.float().mean().item(), 3), "shapes": round(shapes.float().mean().item(), 3),
            "colors": round(colors.float().mean().item(), 3), "pairs": round(pairs.float().mean().item(), 3)}


if __name__ == "__main__":
    main()
