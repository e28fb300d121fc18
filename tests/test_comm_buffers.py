"""DeepSpeed's CPU all-reduce workspaces (/dev/shm) are unlinked once the ranks have mapped them."""
import os

import torch

from megallama.train.comm_buffers import PREFIX, SHM_DIR, buffer_path, release_after_start
from tests.dist_utils import run_distributed


def _start_deepspeed_and_release(rank, world):
    import deepspeed
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    os.environ["LOCAL_SIZE"] = str(world)  # as DeepSpeed's launcher sets it: all ranks on this node
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    mine = buffer_path(rank)
    made = mine.exists()
    released = release_after_start() == mine
    dist.barrier()
    left = sorted(p.name for p in SHM_DIR.glob(buffer_path(0).name[:-1] + "*"))
    backend = ds_comm.comm.cdb
    through_shm = (hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")
                   and getattr(backend, "shm_vector_kernel_level", 0) >= 1)
    summed = torch.full((4096,), float(rank + 1))
    ds_comm.inference_all_reduce(summed)  # every rank still reaches every workspace, unlinked names or not
    return made, released, left, through_shm, summed.unique().tolist()


def test_each_rank_unlinks_its_workspace_once_all_have_mapped_it():
    made, released, left, through_shm, summed = run_distributed(_start_deepspeed_and_release, 2)
    assert made, "DeepSpeed made no shared-memory workspace: nothing was tested"
    assert released and left == []
    assert through_shm and summed == [3.0]


def test_no_workspace_no_error(monkeypatch, tmp_path):
    import megallama.train.comm_buffers as cb

    monkeypatch.setattr(cb, "SHM_DIR", tmp_path)
    assert release_after_start() is None  # no group at all
    assert buffer_path(3, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}).name == \
        f"{PREFIX}_{os.getuid()}_10.0.0.1_29500_3"
