"""Checkpoints: sharded round trips across meshes, retention, unfinished saves, corruption fallback,
mismatch and missing-checkpoint errors."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity_types

from playpen_jax.checkpoint import Checkpointer, CheckpointError, abstract_like

# When orbax fails to read a corrupt checkpoint, tensorstore callbacks still pending fire later into an
# event loop orbax has already closed; Python reports that whenever it collects them, in whichever test
# runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# The suffix orbax gives a step directory (and its item directories) while the step is being written.
TMP_SUFFIX = ".orbax-checkpoint-tmp"

SPECS = {"w": P("data", "tensor"), "emb": P("tensor", None), "b": P(), "big": P("data", None)}


def mesh_of(rows, cols):
    devices = np.array(jax.devices()[: rows * cols]).reshape(rows, cols)
    return Mesh(devices, ("data", "tensor"))


def shardings(mesh):
    """The sharding of every leaf of `make_state`'s tree on `mesh`."""
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    return {"params": {"w": named(SPECS["w"]), "layers": [named(SPECS["emb"]), named(SPECS["b"])],
                       "big": named(SPECS["big"])},
            "step": named(P()), "rng": named(P())}


def make_state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    values = {"params": {"w": rng.standard_normal((8, 8)).astype(np.float32),
                         "layers": [rng.standard_normal((16, 4)).astype(np.float32),
                                    rng.standard_normal(4).astype(jnp.bfloat16)],
                         "big": rng.standard_normal((64, 64)).astype(np.float32)},
              "step": np.int32(100 + seed),
              "rng": np.asarray(jax.random.key_data(jax.random.key(seed)))}
    return jax.tree_util.tree_map(jax.device_put, values, shardings(mesh))


def abstract_on(mesh, state):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, shardings(mesh))


def assert_same_values(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def data_files(directory, step):
    """The array data files orbax wrote for `step` (OCDBT stores under state/)."""
    root = os.path.join(directory, str(step), "state")
    found = [os.path.join(d, f) for d, _, files in os.walk(root) if os.path.basename(d) == "d" for f in files]
    assert found, f"no data files under {root}"
    return found


@pytest.fixture(scope="module")
def mesh24():
    return mesh_of(2, 4)


@pytest.mark.parametrize("target", [(2, 4), (4, 2), (1, 1)])
def test_sharded_round_trip_onto_other_meshes(tmp_path, mesh24, target):
    state = make_state(mesh24)
    meta = {"config": {"lr": 1e-4, "model": "tiny"}, "cursor": [3, 17]}
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(7, state, meta)
        assert ck.steps() == [7] and ck.latest_step() == 7
    target_mesh = mesh_of(*target)
    abstract = abstract_on(target_mesh, state)
    with Checkpointer(str(tmp_path)) as ck:
        restored, restored_meta, step = ck.restore(abstract)
    assert step == 7 and restored_meta == meta
    assert_same_values(restored, state)
    assert isinstance(restored["params"]["layers"], list)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(abstract)):
        assert got.sharding == want.sharding
        assert got.sharding.mesh.devices.shape == target


def test_abstract_like_keeps_shapes_dtypes_and_shardings(mesh24):
    state = make_state(mesh24)
    abstract = abstract_like(state)
    for a, x in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)


def test_meta_round_trip_and_bad_meta(tmp_path, mesh24):
    meta = {"run": "grpo-taboo", "seed": 3, "lr": 2.5e-5, "flags": [True, False, None],
            "cursors": {"taboo": {"episode": 12, "order": [4, 1, 0]}}, "note": "über"}
    state = {"x": jnp.arange(6, dtype=jnp.int32)}
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(1, state, meta)
        _, got, _ = ck.restore(abstract_like(state))
        assert got == meta
        with pytest.raises(CheckpointError, match="step 2 is not JSON-serialisable"):
            ck.save(2, state, {"bad": object()})
        assert ck.steps() == [1]


def test_keep_two_keeps_the_last_two(tmp_path, mesh24):
    with Checkpointer(str(tmp_path), keep=2) as ck:
        for step in range(1, 5):
            ck.save(step * 10, make_state(mesh24, seed=step), {"step": step * 10})
        assert ck.steps() == [30, 40]
        assert ck.latest_step() == 40
        on_disk = sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit())
        assert on_disk == [30, 40]
        restored, meta, step = ck.restore(abstract_on(mesh24, make_state(mesh24)), step=30)
    assert (step, meta) == (30, {"step": 30})
    assert_same_values(restored, make_state(mesh24, seed=3))


def test_prune_deletes_beyond_keep_but_not_from_the_restored_step_on(tmp_path, mesh24):
    # three checkpoints where keep=2 allows two: what a kill between a commit and the deletion of the
    # oldest leaves
    with Checkpointer(str(tmp_path), keep=3) as ck:
        for step in (1, 2, 3, 4):
            ck.save(step, make_state(mesh24, seed=step), {"v": step})
        assert ck.steps() == [2, 3, 4]
    with Checkpointer(str(tmp_path), keep=2) as ck:
        # the run continues from step 2 (newer ones unreadable, say): nothing at or after it goes
        assert ck.prune(restored=2) == [] and ck.steps() == [2, 3, 4]
        assert ck.prune(restored=4) == [2] and ck.steps() == [3, 4]
        assert ck.prune() == [] and ck.steps() == [3, 4]
    on_disk = sorted(int(name) for name in os.listdir(tmp_path) if name.isdigit())
    assert on_disk == [3, 4]
    with Checkpointer(str(tmp_path), keep=1) as ck:
        assert ck.prune() == [3] and ck.steps() == [4]
        restored, meta, step = ck.restore(abstract_on(mesh24, make_state(mesh24)))
    assert (step, meta) == (4, {"v": 4})
    assert_same_values(restored, make_state(mesh24, seed=4))


def test_saving_an_existing_step_replaces_it(tmp_path, mesh24):
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(5, make_state(mesh24, seed=1), {"v": 1})
        ck.save(5, make_state(mesh24, seed=2), {"v": 2})
        assert ck.steps() == [5]
        restored, meta, _ = ck.restore(abstract_on(mesh24, make_state(mesh24)))
    assert meta == {"v": 2}
    assert_same_values(restored, make_state(mesh24, seed=2))


def make_unfinished_step(directory, source_step, step):
    """What a writer killed before orbax's final rename leaves behind: `<step>.orbax-checkpoint-tmp/`
    holding `<item>.orbax-checkpoint-tmp/` directories, no commit marker, and a data file cut short."""
    tmp = os.path.join(directory, f"{step}{TMP_SUFFIX}")
    shutil.copytree(os.path.join(directory, str(source_step)), tmp)
    os.remove(os.path.join(tmp, "commit_success.txt"))
    for item in ("state", "meta", "checksums"):
        os.rename(os.path.join(tmp, item), os.path.join(tmp, item + TMP_SUFFIX))
    data = [os.path.join(d, f) for d, _, files in os.walk(tmp) if os.path.basename(d) == "d" for f in files]
    with open(data[0], "r+b") as f:
        f.truncate(os.path.getsize(data[0]) // 2)
    return tmp


def test_half_written_checkpoint_is_ignored(tmp_path, mesh24):
    assert TMP_SUFFIX == atomicity_types.TMP_DIR_SUFFIX
    directory = str(tmp_path)
    abstract = abstract_on(mesh24, make_state(mesh24))
    with Checkpointer(directory) as ck:
        ck.save(1, make_state(mesh24, seed=1), {"v": 1})
        ck.save(2, make_state(mesh24, seed=2), {"v": 2})
        tmp = make_unfinished_step(directory, 2, 3)
        assert ck.steps() == [1, 2] and ck.latest_step() == 2
    with Checkpointer(directory) as ck:
        assert ck.steps() == [1, 2] and ck.latest_step() == 2
        assert os.path.isdir(tmp)
        restored, meta, step = ck.restore(abstract)
        assert (step, meta, ck.skipped) == (2, {"v": 2}, {})
        assert_same_values(restored, make_state(mesh24, seed=2))
        with pytest.raises(CheckpointError, match="no complete checkpoint for step 3"):
            ck.restore(abstract, step=3)
        # saving the step again replaces the unfinished directory
        ck.save(3, make_state(mesh24, seed=3), {"v": 3})
        assert ck.steps() == [1, 2, 3] and not os.path.exists(tmp)
        restored, meta, step = ck.restore(abstract)
    assert (step, meta) == (3, {"v": 3})
    assert_same_values(restored, make_state(mesh24, seed=3))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def overwrite_middle(path):
    """Flip bits in the middle of the file, keeping its length (its headers stay intact)."""
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.seek(size // 2)
        chunk = f.read(8)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, mesh24, capsys, damage):
    directory = str(tmp_path)
    abstract = abstract_on(mesh24, make_state(mesh24))
    with Checkpointer(directory) as ck:
        for step in (1, 2, 3):
            ck.save(step, make_state(mesh24, seed=step), {"v": step})
    files = data_files(directory, 3)
    if damage == "truncate":
        for path in files:
            truncate(path)
    else:
        overwrite_middle(max(files, key=os.path.getsize))
    capsys.readouterr()
    with Checkpointer(directory) as ck:
        assert ck.steps() == [1, 2, 3]
        restored, meta, step = ck.restore(abstract)
        assert (step, meta) == (2, {"v": 2})
        assert list(ck.skipped) == [3] and ck.skipped[3]
        assert_same_values(restored, make_state(mesh24, seed=2))
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "step 3" in lines[0] and ck.skipped[3] in lines[0]
        # a requested step is not substituted
        with pytest.raises(CheckpointError, match="step 3 .* cannot be read"):
            ck.restore(abstract, step=3)


def test_no_readable_checkpoint_raises(tmp_path, mesh24, capsys):
    directory = str(tmp_path)
    with Checkpointer(directory) as ck:
        for step in (1, 2):
            ck.save(step, make_state(mesh24, seed=step), {"v": step})
    for step in (1, 2):
        for path in data_files(directory, step):
            truncate(path)
    with Checkpointer(directory) as ck:
        with pytest.raises(CheckpointError, match="no checkpoint in .* can be read") as err:
            ck.restore(abstract_on(mesh24, make_state(mesh24)))
        assert "step 2:" in str(err.value) and "step 1:" in str(err.value)
        assert sorted(ck.skipped) == [1, 2]
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def with_leaf(tree, path, value):
    tree = jax.tree_util.tree_map(lambda x: x, tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


@pytest.mark.parametrize("change, expected", [
    (("params", "w", (8, 16), jnp.float32), r"'params/w' has shape \(8, 8\) dtype float32 in the checkpoint "
                                            r"but the abstract state wants shape \(8, 16\) dtype float32"),
    (("step", None, (), jnp.float32), r"'step' has shape \(\) dtype int32 .* wants shape \(\) dtype float32"),
    (("params", "extra", (3,), jnp.float32), r"'params/extra' \(shape \(3,\)\) is not in the checkpoint"),
    (("params", "big", None, None), r"'params/big' \(shape \(64, 64\)\) is in the checkpoint but not in the "
                                    r"abstract state"),
], ids=["shape", "dtype", "extra-leaf", "missing-leaf"])
def test_mismatch_raises_without_fallback(tmp_path, mesh24, change, expected):
    state = make_state(mesh24)
    sharding = NamedSharding(mesh24, P())
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(1, state, {})
        ck.save(2, state, {})
        abstract = abstract_on(mesh24, state)
        top, key, shape, dtype = change
        path = (top, key) if key else (top,)
        leaf = None if shape is None else jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        abstract = with_leaf(abstract, path, leaf)
        with pytest.raises(CheckpointError, match=f"step 2 in .*: leaf {expected}"):
            ck.restore(abstract)
        assert ck.skipped == {}


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_restore_from_empty_or_missing_directory(tmp_path, mesh24, kind):
    directory = str(tmp_path / "runs" / "a") if kind == "missing" else str(tmp_path)
    with Checkpointer(directory) as ck:
        assert os.path.isdir(directory)
        assert ck.steps() == [] and ck.latest_step() is None
        with pytest.raises(CheckpointError, match=f"no complete checkpoint in {directory}"):
            ck.restore(abstract_on(mesh24, make_state(mesh24)))


def test_bad_arguments_are_named(tmp_path, mesh24):
    with Checkpointer(str(tmp_path)) as ck:
        with pytest.raises(CheckpointError, match="'rng' is a typed PRNG key"):
            ck.save(1, {"rng": jax.random.key(0)}, {})
        ck.save(1, {"x": jnp.ones(3)}, {})
        with pytest.raises(CheckpointError, match="leaf 'x' has no sharding"):
            ck.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
        assert ck.steps() == [1]
    with pytest.raises(CheckpointError, match="keep must be a positive integer"):
        Checkpointer(str(tmp_path), keep=0)
