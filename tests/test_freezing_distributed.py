"""Region-frozen training on distributed engines, 2 CPU processes on gloo: frozen entries stay bit-identical.

The jobs run tests/dist_freeze_worker.py (a tiny LLaMA with odd row counts, so FSDP shards unevenly): one
torchrun job for DDP, FSDP2 and their controls, and one `accelerate launch` job for the HF Trainer. This
process makes the starting weights and the region and checks the final weights itself, bit for bit.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dist_freeze_worker as worker
import pytest
import torch
from safetensors.torch import load_file, save_file

from lingregion import freezing

WORKER = Path(worker.__file__)
LOOP_ENGINES = ["ddp", "ddp-control", "fsdp", "fsdp-control", "fsdp-zero2", "callback-fsdp"]


def _launch(launcher: list[str], engines: list[str], folder: Path) -> dict:
    """Run the worker for `engines` in 2 processes; returns {engine: (reports by rank, finals by rank)}."""
    model = worker.tiny_model()
    save_file({n: p.detach().clone() for n, p in model.state_dict().items()}, str(folder / "init.safetensors"))
    worker.tiny_region(model).save(folder / "region.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a job of its own, even when pytest itself runs under torchrun
    t0 = time.time()
    done = subprocess.run(
        [*launcher, str(WORKER), ",".join(engines), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=WORKER.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = {"seconds": time.time() - t0}
    for e in engines:
        reports = [json.loads((folder / f"{e}-rank{r}.json").read_text()) for r in (0, 1)]
        finals = [load_file(str(folder / f"{e}-final{r}.safetensors")) for r in (0, 1)]
        out[e] = (reports, finals)
    return out


@pytest.fixture(scope="module")
def loop_jobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop")
    return _launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], LOOP_ENGINES, folder
    )


@pytest.fixture(scope="module")
def start():
    model = worker.tiny_model()
    return {n: p.detach().clone() for n, p in model.state_dict().items()}, worker.tiny_region(model)


def _frozen_kept_and_rest_moved(finals, init, region) -> None:
    """Both ranks end with the same weights, every frozen entry equal to its start, the rest moved."""
    assert finals[0].keys() == finals[1].keys() and set(region.packed) <= finals[0].keys()
    for n in finals[0]:
        assert torch.equal(finals[0][n], finals[1][n]), n  # replicas / gathered shards agree bit for bit
    for n in region.packed:
        mask = region.mask(n)
        assert torch.equal(finals[0][n][mask], init[n][mask]), n
        moved = (finals[0][n][~mask] != init[n][~mask]).float().mean().item()
        assert moved > 0.9, f"{n}: only {moved:.0%} of the free entries moved"


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "fsdp-zero2", "callback-fsdp"])
def test_frozen_entries_bit_identical_across_ranks_and_steps(loop_jobs, start, engine):
    init, region = start
    reports, finals = loop_jobs[engine]
    _frozen_kept_and_rest_moved(finals, init, region)
    for r in reports:
        assert r["size"] == 2 and len(r["steps"]) == worker.STEPS
        assert all(s["frozen_equal"] for s in r["steps"])  # after every step, not only the last
        assert all(s["free_moved"] > 0.9 for s in r["steps"])
        assert r["moments_at_rest"]  # zero gradients reached the optimizer: AdamW moments stayed 0 there
    if engine == "ddp":
        assert all(r["names"][0].startswith("module.") for r in reports)  # the region's names were mapped
        assert all(r["frozen_here"] == region.count() for r in reports)  # each replica holds all of it
    else:
        assert all(r["dtensor"] for r in reports)
        assert sum(r["frozen_here"] for r in reports) == region.count()  # shards split the region
        assert all(0 < r["frozen_here"] < region.count() for r in reports)
        assert all(r["mapping"]["agree"] for r in reports)  # local indices = a direct DTensor computation
        assert all(r["mapping"]["uneven"] for r in reports)  # and that included uneven shards


@pytest.mark.parametrize("engine", ["ddp-control", "fsdp-control"])
def test_without_the_write_back_the_checks_see_frozen_entries_move(loop_jobs, start, engine):
    """Gradient zeroing alone lets AdamW's weight decay move the region under both engines, and the
    checks above catch it: they can fail."""
    init, region = start
    reports, finals = loop_jobs[engine]
    assert not any(s["frozen_equal"] for r in reports for s in r["steps"])
    n = next(n for n in region.packed if finals[0][n].dim() == 2)
    mask = region.mask(n)
    assert (finals[0][n][mask] != init[n][mask]).float().mean() > 0.9


def test_hf_trainer_under_accelerate_launch(tmp_path, start):
    """Trainer + FreezeCallback in 2 processes started by `accelerate launch` (accelerate wraps the model
    in DDP; --multi_gpu is accelerate's torchrun launcher, and the worker's use_cpu=True keeps it on gloo)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    init, region = start
    reports, finals = _launch(launcher, ["trainer"], tmp_path)["trainer"]
    _frozen_kept_and_rest_moved(finals, init, region)
    for r in reports:
        assert r["size"] == 2 and r["wrapped"] == "DistributedDataParallel"
        assert len(r["steps"]) == worker.STEPS // 2 and all(s["frozen_equal"] for s in r["steps"])


# --- in this process -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, dim, parts",
    [((45, 32), 0, 2), ((7,), 0, 3), ((5, 6, 4), 1, 4), ((3, 8), 1, 3), ((2, 3), 0, 4)],
)
def test_local_indices_match_a_direct_computation(shape, dim, parts):
    """Shard(dim) over `parts` ranks (torch.chunk's split, the last shards shorter or empty): the local
    positions of the region's entries, against the global flat index each local position holds."""
    g = torch.Generator().manual_seed(0)
    numel = int(torch.tensor(shape).prod())
    index = torch.randperm(numel, generator=g)[: numel // 3].sort().values
    numbers = torch.arange(numel).reshape(shape)
    chunks = numbers.chunk(parts, dim)
    seen = []
    for rank in range(parts):
        held = chunks[rank].reshape(-1) if rank < len(chunks) else torch.zeros(0, dtype=torch.int64)
        local_shape = list(shape)
        local_shape[dim] = chunks[rank].shape[dim] if rank < len(chunks) else 0
        offset = [0] * len(shape)
        offset[dim] = sum(c.shape[dim] for c in chunks[:rank])
        which, local = freezing.local_indices(index, shape, tuple(local_shape), tuple(offset))
        position = torch.full((numel,), -1, dtype=torch.int64)
        position[held] = torch.arange(len(held))
        direct = position[index]
        assert torch.equal(which, direct >= 0) and torch.equal(local, direct[direct >= 0])
        seen.append(index[which])
    assert torch.equal(torch.cat(seen).sort().values, index)  # every frozen entry on exactly one rank


def test_plain_names_of_wrapped_parameters():
    assert freezing.plain_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert freezing.plain_name("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert freezing.plain_name("model._fsdp_wrapped_module.layers.1._checkpoint_wrapped_module.w") == "model.layers.1.w"
    assert freezing.plain_name("model.module.w") == "model.module.w"  # a submodule named module, not a wrapper


class _Wrapper(torch.nn.Module):
    """Names its inner model's parameters `module.…`, as DistributedDataParallel does."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        return self.module(**kw)


def test_freeze_on_a_wrapper_holds_the_region_in_one_process(start):
    init, region = start
    model = worker.tiny_model()
    wrapped = _Wrapper(model)
    assert next(iter(dict(wrapped.named_parameters()))).startswith("module.")
    opt = torch.optim.AdamW(wrapped.parameters(), lr=worker.LR, weight_decay=worker.WEIGHT_DECAY)
    attached = freezing.freeze(wrapped, opt, region)
    assert attached.frozen.count == region.count()
    for ids in worker.batches(0, model.config.vocab_size)[:3]:
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    attached.remove()
    params = dict(model.named_parameters())
    for n in region.packed:
        mask = region.mask(n)
        assert torch.equal(params[n].detach()[mask], init[n][mask]), n
        assert (params[n].detach()[~mask] != init[n][~mask]).float().mean() > 0.9
