"""Point clouds: every accepted file format read back exactly, bad files refused with one line,
normalization, the generated scenes and their splits, and the PointNet's order invariance."""
import numpy as np
import pytest
import torch

from core.encoders import get_encoder
from core.encoders.points import PointNet, normalize, read_points
from core.errors import UserError
from train.pointclouds import SHAPES, questions, scene, surface


@pytest.fixture
def cloud():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(size=(50, 3)), rng.integers(0, 256, (50, 3))], 1).astype(np.float32)


def test_every_format_reads_back_the_same_points(tmp_path, cloud):
    from plyfile import PlyData, PlyElement
    from pypcd4 import PointCloud
    expected = cloud.copy()
    expected[:, 3:] /= 255
    np.save(tmp_path / "c.npy", cloud)
    np.savetxt(tmp_path / "c.xyz", cloud)
    vertex = np.array([tuple(r) for r in cloud], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                                        ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "c.ply"))
    rgb = PointCloud.encode_rgb(cloud[:, 3:].astype(np.uint8))
    PointCloud.from_xyzrgb_points(np.concatenate([cloud[:, :3], rgb[:, None]], 1)).save(tmp_path / "c.pcd")
    for name in ("c.npy", "c.xyz", "c.ply", "c.pcd"):
        np.testing.assert_allclose(read_points(tmp_path / name), expected, atol=1e-6, err_msg=name)
    np.save(tmp_path / "xyz.npy", cloud[:, :3])
    assert (read_points(tmp_path / "xyz.npy")[:, 3:] == 0.5).all()  # no colour: grey


def test_bad_point_files_get_one_line_errors(tmp_path, cloud):
    (tmp_path / "c.obj").write_text("v 0 0 0")
    with pytest.raises(UserError, match="unknown point-cloud format .obj; accepted"):
        read_points(tmp_path / "c.obj")
    np.save(tmp_path / "four.npy", cloud[:, :4])
    with pytest.raises(UserError, match=r"shape \(50, 4\)"):
        read_points(tmp_path / "four.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="unreadable .npy"):  # never unpickled
        read_points(tmp_path / "obj.npy")
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat nonsense\n")
    with pytest.raises(UserError, match="unreadable .ply"):
        read_points(tmp_path / "bad.ply")
    bad = cloud.copy()
    bad[3, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(UserError, match="NaN"):
        read_points(tmp_path / "nan.npy")
    with pytest.raises(UserError, match="unknown encoder 'nope'; accepted: .*pointnet"):
        get_encoder("nope")


def test_normalize_centres_scales_and_samples_to_a_fixed_count(cloud):
    for n in (16, 200):
        out = normalize(cloud, n)
        assert out.shape == (n, 6)
        np.testing.assert_allclose(out[:, :3].mean(0), 0, atol=1e-5)
        assert abs(np.linalg.norm(out[:, :3], axis=1).max() - 1) < 1e-5


def test_scenes_are_deterministic_split_apart_and_answerable():
    a, objs = scene("train", 7)
    b, objs2 = scene("train", 7)
    assert np.array_equal(a, b) and objs == objs2
    assert not np.array_equal(scene("test", 7)[0], a)
    counts = [len(scene("train", i)[1]) for i in range(60)]
    assert set(counts) == {1, 2, 3}
    for shape in SHAPES:
        pts = surface(shape, 500, np.random.default_rng(0))
        assert pts.shape == (500, 3) and np.abs(pts).max() <= 1.0 + 1e-9
    qa = dict(questions(objs, np.random.default_rng(0)))
    assert qa["How many objects are there?"] == str(len(objs))


def test_tiny_random_pointnet_is_invariant_to_point_order():
    torch.manual_seed(0)
    net = PointNet(width=32)
    x = torch.randn(2, 100, 6)
    torch.testing.assert_close(net(x), net(x[:, torch.randperm(100)]))


def test_shipped_point_encoder_reads_generated_scenes():
    """The encoder in assets/ (trained by train.point_encoder): its heads name the count, the
    shapes and the colours of held-out test scenes, e.g. a lone sphere is a sphere."""
    encoder = get_encoder("pointnet", "points")
    right = 0
    for i in range(20):
        points, objects = scene("test", i)
        found = {name for name, _ in encoder.labels([encoder.load(points)], k=10)[0]}
        wanted = {f"{len(objects)} object{'s' if len(objects) > 1 else ''}"}
        wanted |= {o["shape"] for o in objects} | {o["color"] for o in objects}
        right += found == wanted
    assert right >= 17, right  # 96% of the 400 test scenes when it was trained


def test_shipped_point_encoder_readings_are_the_scenes_facts_as_probabilities():
    """pointnet-readings: the heads' probabilities as the embedding, laid out as the facts the
    encoder was trained on (train.point_encoder.targets), pairs included: which shape has which colour."""
    from train.point_encoder import targets
    encoder = get_encoder("pointnet-readings", "points")
    clouds, facts = zip(*(scene("test", i) for i in range(20)))
    readings = encoder.embed([encoder.load(c) for c in clouds])
    assert readings.shape == (20, encoder.dim) and encoder.dim == 3 + len(targets(facts[0])) - 1
    torch.testing.assert_close(readings[:, :3].sum(1), torch.ones(20))
    truth = torch.tensor(np.stack([targets(f) for f in facts]))
    right = sum(bool(((r[3:] > 0.5) == (t[1:] > 0.5)).all()) and int(r[:3].argmax()) == int(t[0])
                for r, t in zip(readings, truth))
    assert right >= 17, right  # every bit right on 96.2% of the 400 test scenes when it was trained


def test_points_diagnostic_hands_the_bind_network_the_ground_truth_of_the_real_questions(tmp_path):
    import json

    from train.point_encoder import targets
    from train.pointclouds import COLORS, write_dataset
    from train.points_diagnostic import KINDS, SUBJECTS, SceneTruth, write_records
    write_dataset(tmp_path / "real", n_train=0, n_test=5)
    path = write_records(tmp_path / "diag", "test", 5, with_question=True)
    real = [json.loads(line) for line in (tmp_path / "real" / "test.jsonl").read_text().splitlines()]
    diag = [json.loads(line) for line in path.read_text().splitlines()]
    # the same questions and answers as the dataset the adapters train on
    assert [(r["instruction"], r["output"]) for r in diag] == [(r["instruction"], r["output"]) for r in real]
    named = 0
    for r, rr in zip(diag, real):
        vector = SceneTruth().load(tmp_path / "diag" / r["points"]).numpy()
        objects = scene("test", int(rr["points"].split("/")[1][:5]))[1]
        assert r["objects"] == len(objects)
        np.testing.assert_array_equal(vector[:-len(KINDS) - len(SUBJECTS)], targets(objects))
        kind, subject = np.flatnonzero(vector[-len(KINDS) - len(SUBJECTS):-len(SUBJECTS)]), np.flatnonzero(vector[-len(SUBJECTS):])
        assert r["instruction"].startswith(KINDS[int(kind[0])]) and len(kind) == len(subject) == 1
        word = SUBJECTS[int(subject[0])]
        if word in SHAPES or word in COLORS:  # "What color is the cube?" names the cube
            assert f" {word}?" in r["instruction"]
            named += 1
    assert named >= 5
