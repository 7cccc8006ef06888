"""deblur() on dask: chunks of whole tiles (the numpy path's result, each tile computed once), torch's threads
in dask's tasks, and dask.distributed (the model put on each worker once and loaded there once, the device
picked there). The speed targets are benchmarks/scale_out.py's."""

import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import randomize
from demoe import DeMoE, _chunks, _runner, deblur, save_model
from demoe.checkpoint import model_loads, registered_model
from demoe.tiling import plan_axis

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")


def tiny(seed=0, width=4):
    return randomize(DeMoE(width=width, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]), seed=seed)


# -- chunks of whole tiles -----------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 6000), tile=st.sampled_from([32, 64, 256, 512]), chunk=st.integers(1, 9000))
def test_chunks_are_a_few_whole_tiles_and_regular(length, tile, chunk):
    axis = plan_axis(length, tile, tile // 8, 16)
    bounds = _chunks.chunk_bounds(axis, chunk)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == length and (sizes > 0).all()
    assert all(b % axis.stride == 0 for b in bounds[:-1])  # chunks start where tiles do
    # Regular (all alike but the last, which is no larger): what zarr needs to write them.
    assert len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]
    if len(sizes) > 1:  # a few tiles each: about the input's chunk, but within CHUNK_TILES
        lo, hi = _chunks.CHUNK_TILES
        want = min(max(round(chunk / axis.stride), lo), hi)
        assert lo <= sizes[0] // axis.stride <= want and sizes[0] // axis.stride > want / 2


CASES = {  # shape, chunks, options: colour, gray, RGBA, stacks, BGR, integers, tile routing, ensemble, no overlap,
    # chunks of 1 px, of a channel, of the whole image
    "rgb": ((90, 70, 3), (40, 35, 3), dict(tile_size=16, overlap=4)),
    "tiny chunks": ((2, 100, 130), (1, 9, 7), dict(tile_size=32, overlap=8)),
    "one huge chunk": ((300, 260), (300, 260), dict(tile_size=32, overlap=4)),
    "rgba bgr uint16": ((150, 97, 4), (64, 64, 2), dict(tile_size=32, overlap=6, bgr=True)),
    "5 channels": ((70, 50, 5), (30, 30, 5), dict(tile_size=32, overlap=4, channel_axis=-1)),
    "tile routing, ensemble": ((80, 90, 3), (40, 40, 3), dict(tile_size=32, overlap=8, routing="tile", ensemble=2)),
    "no overlap": ((64, 100), (32, 32), dict(tile_size=32, overlap=0)),
    "smaller than a tile": ((5, 7), (2, 3), {}),
    "1 px chunks": ((30, 40), (1, 1), dict(tile_size=16, overlap=4)),
    "4-D: planes of colour": ((2, 70, 50, 3), (1, 30, 25, 1), dict(tile_size=32, overlap=4)),
}


@pytest.mark.parametrize("case", CASES)
def test_dask_gives_the_numpy_paths_result(case):
    shape, chunks, kw = CASES[case]
    rng = np.random.default_rng(len(case))
    img = (rng.integers(0, 4096, shape).astype(np.uint16) if "uint16" in case
           else rng.random(shape).astype(np.float32))
    kw = dict(model=tiny(1), device="cpu", task=None if "routing" in kw else "defocus", **kw)
    ref = deblur(img, preserve_mean=False, **kw)
    out = deblur(da.from_array(img, chunks=chunks), **kw)
    assert out.dtype == img.dtype and out.shape == img.shape
    # The same tiles and windows: equal but for the order of float32 additions.
    np.testing.assert_allclose(out.compute(), ref, rtol=0, atol=1 if img.dtype == np.uint16 else 1e-6)


def test_each_tile_computed_once_reading_its_overlap_only(monkeypatch):
    model = tiny(2)
    seen, reads = [], []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda x, *a, **k: seen.append(len(x)) or original(x, *a, **k))
    tile_sums = _chunks._tile_sums

    def recording(space, *, grid, block_info=None, **kw):
        where = block_info[0]["chunk-location"]
        reads.append((space.shape[-3:-1], grid.piece(0, where[-3]), grid.piece(1, where[-2])))
        return tile_sums(space, grid=grid, block_info=block_info, **kw)

    monkeypatch.setattr(_chunks, "_tile_sums", recording)
    img = np.random.default_rng(0).random((230, 300)).astype(np.float32)
    kw = dict(model=model, device="cpu", task="defocus", tile_size=32, overlap=8)
    out, info = deblur(da.from_array(img, chunks=(50, 60)), return_info=True, **kw)
    out = out.compute()
    assert sum(seen) == info["tiles"] == deblur(img, return_info=True, **kw)[1]["tiles"]  # none twice
    assert len(reads) > 9
    for (h, w), ay, ax in reads:  # a chunk's tiles and the overlap after them: no more context than that
        assert (h, w) == (ay.count * ay.stride + 8, ax.count * ax.stride + 8)


def test_rechunked_for_the_network_and_back_if_asked():
    model = tiny(3)
    img = np.random.default_rng(0).random((200, 150, 3)).astype(np.float32)
    lazy = da.from_array(img, chunks=(10, 10, 1))  # tiny chunks: 300 of them
    out = deblur(lazy, model=model, device="cpu", task="defocus", tile_size=32, overlap=4)
    stride = 28
    assert out.chunks[:2] == ((2 * stride,) * 3 + (200 - 6 * stride,), (2 * stride,) * 2 + (150 - 4 * stride,))
    assert out.chunks[2] == (3,)
    back = deblur(lazy, model=model, device="cpu", task="defocus", tile_size=32, overlap=4, chunks="input")
    assert back.chunks == lazy.chunks
    np.testing.assert_array_equal(back.compute(), out.compute())
    tall = np.random.default_rng(1).random((600, 40)).astype(np.float32)  # one huge chunk: 22 x 2 tiles
    huge = deblur(da.from_array(tall, chunks=-1), model=model, device="cpu", task="defocus", tile_size=32, overlap=4)
    assert huge.chunks == ((_chunks.CHUNK_TILES[1] * stride,) * 2 + (600 - 16 * stride,), (40,))


@pytest.mark.parametrize("chunks, message", [("input", "for dask input"), ("auto", "chunks must be None"),
                                             ((64, 64), "chunks must be None")])
def test_chunks_argument_is_checked(chunks, message):
    img = np.zeros((32, 32), np.float32)
    lazy = da.from_array(img) if message != "for dask input" else img
    with pytest.raises(ValueError, match=message):
        deblur(lazy, model=tiny(), device="cpu", chunks=chunks)


# -- torch's threads in dask's tasks -------------------------------------------------------
@pytest.fixture
def network_threads(monkeypatch):
    """torch's thread count in every network call, and torch's own setting put back after the test."""
    seen = []
    run = _runner.Runner._run
    monkeypatch.setattr(_runner.Runner, "_run", lambda self, chunk: seen.append(torch.get_num_threads())
                        or run(self, chunk))
    before = torch.get_num_threads()
    yield seen
    torch.set_num_threads(before)


def _fresh_thread_threads() -> int:
    """What a thread that starts now gets: torch's process-wide setting."""
    got = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    return got[0]


@pytest.mark.parametrize("scheduler, pool, each", [("threads", 2, 2), ("threads", 4, 1), ("sync", None, 4)])
def test_threaded_scheduler_shares_torch_threads(network_threads, scheduler, pool, each):
    torch.set_num_threads(4)
    img = np.random.default_rng(0).random((120, 120)).astype(np.float32)
    lazy = deblur(da.from_array(img, chunks=56), model=tiny(), device="cpu", task="defocus", tile_size=32,
                  overlap=4)
    with dask.config.set(scheduler=scheduler, num_workers=pool):
        lazy.compute()
    assert network_threads and set(network_threads) == {each}  # 4 threads shared among the pool's
    assert torch.get_num_threads() == 4 and _fresh_thread_threads() == 4  # and put back after


def test_distributed_worker_runs_torch_on_one_thread_per_task(network_threads, monkeypatch):
    """A worker of N threads runs N chunks at once, one torch thread each; the device is picked there."""
    distributed = pytest.importorskip("distributed")
    torch.set_num_threads(2)
    decided = []
    resolve = _chunks.resolve_device

    def where(device):
        try:
            decided.append((device, distributed.get_worker().name))
        except ValueError:
            decided.append((device, "client"))
        return resolve(device)

    monkeypatch.setattr(_chunks, "resolve_device", where)
    img = np.random.default_rng(0).random((120, 120)).astype(np.float32)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c:
        with distributed.Client(c):
            lazy = deblur(da.from_array(img, chunks=56), model=tiny(), task="defocus", tile_size=32, overlap=4)
            assert not decided  # nothing decided when the graph is made...
            out = lazy.compute()
    assert decided and set(decided) == {(None, 0)}  # ... the worker decides, with device=None ("auto")
    assert set(network_threads) == {1}
    assert torch.get_num_threads() == 2 and _fresh_thread_threads() == 2
    np.testing.assert_allclose(out, deblur(img, model=tiny(), task="defocus", tile_size=32, overlap=4,
                                           preserve_mean=False), atol=1e-6)


def test_worker_defaults_follow_its_device():
    plan = _chunks.ChunkPlan(_chunks.ModelRef("object", None, tiny(), "cpu"), None, None, "auto", ())
    assert (plan.batch, plan.precision, plan.device) == (None, "auto", None)  # left to the worker
    fields = dict(task="defocus", routing="image", tile=32, overlap=4, streams=1, bgr=False, lo=0.0, hi=1.0,
                  preserve_mean=None, window=None, ensemble=1, nan_policy="raise")
    resolved = _chunks.ChunkPlan(plan.model, None, None, "auto", tuple(fields.items())).plan()
    assert (resolved.device.type, resolved.batch, resolved.precision) == ("cpu", 1, "fp32")


def test_a_model_not_on_the_worker_is_named():
    with pytest.raises(LookupError, match="demoe-model-x is not on this worker.*Client that is active when "
                                          "deblur\\(\\) is called"):
        registered_model("demoe-model-x", "cpu")


# -- dask.distributed worker processes ---------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c, distributed.Client(c) as client:
        yield client


def _zarr(tmp_path, img, chunks):
    pytest.importorskip("zarr")
    da.from_array(img, chunks=chunks).to_zarr(str(tmp_path / "in.zarr"))
    return da.from_zarr(str(tmp_path / "in.zarr"))


def _loads(client, what):
    """Models loaded in each worker process whose name contains ``what``."""
    return [sum(n for (name, _), n in loads.items() if what in name) for loads in client.run(model_loads).values()]


def test_model_object_sent_to_each_worker_once_not_in_the_graph(cluster, tmp_path):
    model = tiny(4)
    img = np.random.default_rng(0).random((96, 128, 3)).astype(np.float32)
    lazy = _zarr(tmp_path, img, (32, 32, 3))
    ref = deblur(img, model=model, device="cpu", task="defocus", tile_size=32, overlap=4, preserve_mean=False)
    # The model is 280 kB: a graph that held it would be over this threshold.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "150kB"}), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # twice: put on the workers once, loaded there once
            out = deblur(lazy, model=model, device="cpu", task="defocus", tile_size=32, overlap=4).compute()
            np.testing.assert_allclose(out, ref, atol=1e-6)
    assert not [w for w in caught if "large graph" in str(w.message)]
    assert _loads(cluster, "demoe-model-") == [1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_workers_malloc_thresholds_suit_torch(cluster, tmp_path):
    """dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which halved torch's speed: the workers raise it."""
    import os

    assert set(cluster.run(lambda: int(os.environ["MALLOC_TRIM_THRESHOLD_"])).values()) == {65536}
    img = np.random.default_rng(2).random((96, 96)).astype(np.float32)
    deblur(_zarr(tmp_path, img, (32, 32)), model=tiny(), task="defocus", tile_size=32, overlap=4).compute()
    assert list(cluster.run(lambda: _chunks._malloc_set).values()) == [_chunks.MALLOC_THRESHOLDS] * 2


def test_checkpoint_file_loaded_once_per_worker(cluster, tmp_path):
    path = save_model(tiny(5, width=8), tmp_path / "tiny8.safetensors")
    img = np.random.default_rng(1).random((150, 140)).astype(np.float32)
    lazy = _zarr(tmp_path, img, (40, 40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = deblur(lazy, model=path, task="defocus", tile_size=32, overlap=4).compute()
    assert not [w for w in caught if "large graph" in str(w.message)]
    np.testing.assert_allclose(out, deblur(img, model=path, task="defocus", tile_size=32, overlap=4,
                                           preserve_mean=False), atol=1e-6)
    assert _loads(cluster, "tiny8.safetensors") == [1, 1]


def test_checkpoint_missing_on_a_worker_is_one_clear_error(cluster, tmp_path):
    """A path the client sees but a worker does not (no shared file system): the worker says so."""
    path = save_model(tiny(6, width=8), tmp_path / "only_here.safetensors")
    img = np.random.default_rng(3).random((64, 64)).astype(np.float32)
    lazy = deblur(_zarr(tmp_path, img, (32, 32)), model=path, task="defocus", tile_size=32, overlap=4)
    path.unlink()  # read on the client when deblur() was called; gone when the workers look for it
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found where this chunk is computed: .*"
                                                r"only_here.safetensors .*worker tcp://.* does not see that path"):
        lazy.compute()


def test_client_closed_mid_compute_leaves_the_cluster_usable(cluster, tmp_path):
    """The computation is cancelled; the model another Client put on the workers serves the next one."""
    distributed = pytest.importorskip("distributed")
    model = tiny(7)
    img = np.random.default_rng(4).random((160, 160)).astype(np.float32)
    lazy = _zarr(tmp_path, img, (32, 32))
    with distributed.Client(cluster.cluster) as other:  # the active Client while deblur() is called
        out = deblur(lazy, model=model, task="defocus", tile_size=32, overlap=4)
        running = other.compute(out)
    with pytest.raises(distributed.client.FutureCancelledError):
        running.result()
    np.testing.assert_allclose(cluster.compute(out).result(), deblur(img, model=model, task="defocus", tile_size=32,
                                                                     overlap=4, preserve_mean=False), atol=1e-6)
