"""Train the project's point-cloud encoder (PointNet) on generated scenes.

    python -m train.point_encoder [--epochs 10] [--scenes 4000] [--device cpu|cuda] [--out FILE]

Nothing pretrained for point clouds ships in any package, so the encoder learns what the
questions ask about: heads for the object count, which shapes and which colours are present, and
which shape has which colour. Only the PointNet (not the heads) is used as the encoder; the
heads' test accuracies are printed and stored in the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
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


def _scene_and_targets(args):
    pts, objects = scene(*args)
    return pts, targets(objects)


def scenes(split: str, n: int, workers: int = 1):
    """All POINTS_PER_SCENE points of scenes 0..n-1 of `split`, (n, P, 6), and their targets."""
    jobs = [(split, i) for i in range(n)]
    if workers > 1:
        from multiprocessing import Pool
        with Pool(workers) as pool:
            made = pool.map(_scene_and_targets, jobs, chunksize=256)
    else:
        made = [_scene_and_targets(j) for j in jobs]
    return torch.from_numpy(np.stack([m[0] for m in made])), torch.from_numpy(np.stack([m[1] for m in made]))


def sample(clouds: torch.Tensor, n: int = N_POINTS) -> torch.Tensor:
    """core.encoders.points.normalize on a batch, on the clouds' device: a fresh random subset
    of n points of each cloud, centred and scaled into the unit sphere."""
    idx = torch.rand(clouds.shape[:2], device=clouds.device).argsort(1)[:, :n]
    out = torch.gather(clouds, 1, idx.unsqueeze(-1).expand(-1, -1, clouds.shape[-1])).float()
    xyz = out[..., :3] - out[..., :3].mean(1, keepdim=True)
    xyz = xyz / xyz.norm(dim=-1).amax(1).clamp_min(1e-6)[:, None, None]
    return torch.cat([xyz, out[..., 3:]], -1)


def losses_and_hits(net, heads, x, y):
    count_logits, multi_logits = heads(net(x))
    loss = F.cross_entropy(count_logits, y[:, 0].long()) + F.binary_cross_entropy_with_logits(multi_logits, y[:, 1:])
    count_ok = count_logits.argmax(-1) == y[:, 0].long()
    multi_ok = (multi_logits > 0) == (y[:, 1:] > 0.5)
    return loss, count_ok, multi_ok


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.point_encoder", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--scenes", type=int, default=SPLITS["train"], help="training scenes (the train split's first N)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=1, help="processes generating scenes")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, help="fewer epochs if the first shows they would take longer")
    ap.add_argument("--out", default=str(WEIGHTS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    dev = torch.device(args.device)
    test_clouds, test_y = scenes("test", SPLITS["test"])
    test_x = torch.from_numpy(np.stack([normalize(c.numpy(), N_POINTS, seed=10**6 + i) for i, c in enumerate(test_clouds)]))
    test_x, test_y = test_x.to(dev), test_y.to(dev)
    train_clouds, train_y = scenes("train", args.scenes, args.workers)
    train_clouds, train_y = train_clouds.to(dev), train_y.to(dev)
    print(f"{args.scenes} training scenes ready ({time.time() - t0:.0f} s)", flush=True)
    net, heads = PointNet(width=args.width).to(dev), PointHeads(args.width, N_SHAPES, N_COLORS).to(dev)
    params = [*net.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    per_epoch = args.scenes // args.batch_size
    plan = {"steps": args.epochs * per_epoch}  # shortened by --minutes after the first epoch

    def warmup_then_cosine(step):
        warm = max(1, per_epoch // 2)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, plan["steps"] - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_cosine)
    epoch = 0
    while epoch < args.epochs:
        t_epoch = time.time()
        order = torch.randperm(args.scenes, device=dev)
        net.train()
        total = 0.0
        for b in range(per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            loss, _, _ = losses_and_hits(net, heads, sample(train_clouds[idx]), train_y[idx])  # new subsets each time
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if epoch == 0 and args.minutes:
            args.epochs = max(1, min(args.epochs, int(args.minutes * 60 / (time.time() - t_epoch))))
            plan["steps"] = args.epochs * per_epoch
        epoch += 1
        report = evaluate(net, heads, test_x, test_y)
        print(f"epoch {epoch}/{args.epochs} loss {total / per_epoch:.4f} test {report} "
              f"({time.time() - t0:.0f} s)", flush=True)
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    state.update({f"head.{k}": v.cpu() for k, v in heads.state_dict().items()})
    from safetensors.torch import save_file
    with atomic_path(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp,
                  metadata={"point_encoder": json.dumps({"width": args.width, "points": N_POINTS, "epochs": args.epochs,
                                                         "scenes": args.scenes,
                                                         "shapes": list(SHAPES), "colors": list(COLORS),
                                                         "test": report, "command": " ".join(["python -m train.point_encoder", *(argv or sys.argv[1:])])})})
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
