"""Generated point-cloud scenes with questions about them: 1 to 3 objects (sphere, cube,
cylinder, cone, torus, pyramid) with random pose, scale, noise and colour, and questions about
shape, count and colour with one-word answers. Scene i of a split comes from a seed that no
other split uses, so train and test never share a scene.
"""
from __future__ import annotations

import hashlib

import numpy as np

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.3, 0.9),
          "yellow": (0.95, 0.9, 0.1), "white": (0.95, 0.95, 0.95), "purple": (0.6, 0.2, 0.8)}
SPLITS = {"train": 4000, "test": 400}
POINTS_PER_SCENE = 2048


def _seed(split: str, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"points/{split}/{i}".encode()).digest()[:8], "little")


def surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points on the unit-sized surface of `shape`, (n, 3)."""
    if shape == "sphere":
        p = rng.normal(size=(n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if shape == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)
        return p
    if shape == "cylinder":  # side and caps by area (r=1, h=2: side 4*pi, caps 2*pi)
        t = rng.uniform(0, 2 * np.pi, n)
        on_side = rng.uniform(0, 1, n) < 2 / 3
        r = np.where(on_side, 1.0, np.sqrt(rng.uniform(0, 1, n)))
        z = np.where(on_side, rng.uniform(-1, 1, n), rng.choice([-1.0, 1.0], n))
        return np.stack([r * np.cos(t), r * np.sin(t), z], 1)
    if shape == "cone":  # apex at z=1, base radius 1 at z=-1
        t = rng.uniform(0, 2 * np.pi, n)
        on_side = rng.uniform(0, 1, n) < 0.7
        s = np.sqrt(rng.uniform(0, 1, n))  # uniform over the lateral area
        r = np.where(on_side, s, np.sqrt(rng.uniform(0, 1, n)))
        z = np.where(on_side, 1 - 2 * s, -1.0)
        return np.stack([r * np.cos(t), r * np.sin(t), z], 1)
    if shape == "torus":
        u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
        R, r = 0.7, 0.3
        return np.stack([(R + r * np.cos(v)) * np.cos(u), (R + r * np.cos(v)) * np.sin(u), r * np.sin(v)], 1)
    if shape == "pyramid":  # square base z=-1, apex (0, 0, 1)
        base = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1]], float)
        apex = np.array([0.0, 0.0, 1.0])
        tris = [(base[0], base[1], base[2]), (base[0], base[2], base[3])]
        tris += [(base[k], base[(k + 1) % 4], apex) for k in range(4)]
        area = np.array([np.linalg.norm(np.cross(b - a, c - a)) / 2 for a, b, c in tris])
        pick = rng.choice(len(tris), n, p=area / area.sum())
        a, b, c = (np.stack([tris[k][j] for k in pick]) for j in range(3))
        u, v = rng.uniform(0, 1, (n, 1)), rng.uniform(0, 1, (n, 1))
        flip = (u + v) > 1
        u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
        return a + u * (b - a) + v * (c - a)
    raise ValueError(shape)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def scene(split: str, i: int) -> tuple[np.ndarray, list[dict]]:
    """(POINTS_PER_SCENE, 6) xyz+rgb and its objects [{shape, color}], deterministic in (split, i)."""
    rng = np.random.default_rng(_seed(split, i))
    count = int(rng.integers(1, 4))
    shapes = rng.choice(len(SHAPES), count, replace=False)
    colors = rng.choice(len(COLORS), count, replace=False)
    # objects on separate slots of a circle, so they never overlap
    slots = rng.permutation(6)[:count] * (2 * np.pi / 6) + rng.uniform(0, 2 * np.pi)
    sizes = rng.multinomial(POINTS_PER_SCENE - count, [1 / count] * count) + 1
    parts, objects = [], []
    for k in range(count):
        shape, color = SHAPES[shapes[k]], list(COLORS)[colors[k]]
        pts = surface(shape, int(sizes[k]), rng) @ random_rotation(rng).T * rng.uniform(0.5, 0.9)
        centre = np.array([np.cos(slots[k]), np.sin(slots[k]), 0.0]) * (2.0 if count > 1 else 0.0)
        pts = pts + centre + rng.normal(0, rng.uniform(0.005, 0.03), pts.shape)
        rgb = np.clip(np.array(COLORS[color]) + rng.normal(0, 0.05, (len(pts), 3)), 0, 1)
        parts.append(np.concatenate([pts, rgb], 1))
        objects.append({"shape": shape, "color": color})
    return np.concatenate(parts).astype(np.float32), objects


NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def questions(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs about a scene."""
    qa = [("How many objects are there?", str(len(objects)))]
    if len(objects) == 1:
        qa.append(("What shape is the object?", objects[0]["shape"]))
        qa.append(("What color is the object?", objects[0]["color"]))
    else:
        obj = objects[int(rng.integers(len(objects)))]
        qa.append((f"What color is the {obj['shape']}?", obj["color"]))
        qa.append((f"What shape is {obj['color']}?", obj["shape"]))
    probe = SHAPES[int(rng.integers(len(SHAPES)))]
    qa.append((f"Is there a {probe}?", "yes" if any(o["shape"] == probe for o in objects) else "no"))
    return qa


def scene_questions(split: str, i: int, objects: list[dict]) -> list[tuple[str, str]]:
    """Scene i's questions as the dataset asks them (a seed of their own, beside the scene's)."""
    return questions(objects, np.random.default_rng(_seed(split, i) + 1))


def write_dataset(out, n_train: int = SPLITS["train"], n_test: int = SPLITS["test"]):
    """out/{train,test}/NNNNN.npy (xyz+rgb, float16) and out/{train,test}.jsonl records
    {"points": path, "instruction": question, "output": answer}, paths relative to `out`; and
    out/val.jsonl, the first 200 test questions, for the validation loss while training."""
    from train.data import write_generated

    def item(out, split: str, i: int) -> list[dict]:
        points, objects = scene(split, i)
        name = f"{split}/{i:05d}.npy"
        np.save(out / name, points.astype(np.float16))
        return [{"points": name, "instruction": q, "output": a} for q, a in scene_questions(split, i, objects)]
    write_generated(out, {"train": n_train, "test": n_test}, item, "scenes")


def write_examples(out, n: int = 4):
    """A few test-split scenes for the app's examples, named after what they hold."""
    from pathlib import Path

    from core.encoders.points import normalize
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for i in range(100):
        points, objects = scene("test", i)
        name = "-and-".join(f"{o['color']}-{o['shape']}" for o in objects)
        if len(objects) in seen:
            continue
        seen.add(len(objects))
        np.save(out / f"{name}.npy", normalize(points, seed=i).astype(np.float16))
        if len(seen) == min(n, 3):
            break


if __name__ == "__main__":
    from train.data import generator_cli
    generator_cli("train.pointclouds", "point-cloud", "data/points", SPLITS, write_dataset, write_examples)
