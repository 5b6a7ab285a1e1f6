"""One process of a 2-process torchrun job that trains a tiny model with a region frozen (see
test_freezing_distributed.py). Run as `torchrun --nproc_per_node 2 dist_freeze_worker.py ENGINE FOLDER`:
FOLDER holds the starting weights (init.safetensors) and the region (region.safetensors), made by the test;
for each engine each rank writes {ENGINE}-rank{R}.json (what it checked at every step) and
{ENGINE}-final{R}.safetensors (every parameter, whole, after training) there.

ENGINE is one of
  ddp          DistributedDataParallel around the model, `freeze` on the wrapper (names `module.…`);
  fsdp         FSDP2 `fully_shard` on each decoder layer and the root (DTensor parameters, Shard(0));
  fsdp-zero2   the same with reshard_after_forward=False, ZeRO-2's layout;
  callback-fsdp
               FreezeCallback's events in the Trainer's order around fully_shard (on_train_begin before
               sharding, as accelerate does), with no Trainer: CPU accelerate does not run FSDP;
  ddp-control, fsdp-control
               the same with the write-back after each step detached (gradient zeroing only), which must
               let weight decay move the frozen entries: proof that the checks can fail;
  trainer      Hugging Face Trainer with FreezeCallback (accelerate wraps the model in DDP).
Several engines, comma-separated, run one after the other in the same processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lingregion import freezing, models
from lingregion.regions import Region, select

# Trainer arguments for accelerate's FSDP2: each decoder layer and the root sharded with fully_shard.
FSDP_TRAINER = dict(
    fsdp="full_shard",
    fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True},
)
STEPS = 6
LR, WEIGHT_DECAY = 1e-2, 0.1  # large moves, so that any leak into a frozen entry shows
SEQ, BATCH = 16, 2


def tiny_model() -> torch.nn.Module:
    """A tiny LLaMA whose row counts are odd (45, 301), so that FSDP's Shard(0) splits them unevenly."""
    config = LlamaConfig(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=45,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1, so a norm entry that moves is seen to move
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    return model.float()


def tiny_region(model) -> Region:
    """30% of the entries of every scored matrix and norm, at random."""
    params = dict(model.named_parameters())
    return select({n: torch.zeros(params[n].shape) for n in models.scored_names(model)}, 0.3, "random", seed=1)


def batches(rank: int, vocab: int) -> list[torch.Tensor]:
    """Each rank its own token ids, so that DDP's gradient average mixes different gradients."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(3, vocab, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter's full value on every rank (a DTensor is gathered)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def check(model, init: dict, region: Region) -> dict:
    """Whether every frozen entry equals its start bit for bit, and the share of free entries that moved."""
    params = freezing.named_parameters(model)
    equal, moved, free = True, 0, 0
    for n in region.packed:
        mask, now = region.mask(n), whole(params[n])
        equal &= torch.equal(now[mask], init[n][mask])
        moved += int((now[~mask] != init[n][~mask]).sum())
        free += int((~mask).sum())
    return {"frozen_equal": bool(equal), "free_moved": moved / free}


def main() -> None:
    engines, folder = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    init, region = load_file(str(folder / "init.safetensors")), Region.load(folder / "region.safetensors")
    for engine in engines:  # one job runs several engines: the start-up of two processes is the slow part
        model = tiny_model()
        model.load_state_dict(init)
        report: dict = {"rank": rank, "size": int(os.environ["WORLD_SIZE"]), "engine": engine, "steps": []}
        if engine.startswith("trainer"):
            final = run_trainer(engine, model, region, init, report, folder)
        else:
            if not dist.is_initialized():
                dist.init_process_group("gloo")
            final = run_loop(engine, model, batches(rank, model.config.vocab_size), region, init, report)
        save_file(final, str(folder / f"{engine}-final{rank}.safetensors"))
        (folder / f"{engine}-rank{rank}.json").write_text(json.dumps(report))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_loop(engine: str, model, data, region: Region, init: dict, report: dict) -> dict:
    """A plain torch loop (AdamW, clipping) under DDP or FSDP2 with `freeze` attached."""
    callback = None
    if engine.startswith("ddp"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif engine.startswith(("fsdp", "callback-fsdp")):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if engine == "callback-fsdp":  # the Trainer's order: on_train_begin sees the model before sharding
            callback = freezing.FreezeCallback(region)
            callback.on_train_begin(None, None, None, model=model)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        # fsdp-zero2 keeps the gathered parameters between forward and backward: ZeRO-2's layout
        # (sharded optimizer state and gradients, whole parameters during the step's compute).
        reshard = engine != "fsdp-zero2"
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        wrapped = fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        report["mapping"] = mapping_checks(wrapped, region)
    else:
        raise SystemExit(f"unknown engine {engine}")
    names = list(dict(wrapped.named_parameters()))
    report["names"] = names[:3]
    report["dtensor"] = any(hasattr(p, "device_mesh") for p in wrapped.parameters())
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    if callback is None:
        attached = freezing.freeze(wrapped, opt, region)
        frozen = attached.frozen
        if engine.endswith("-control"):
            attached._handle.remove()  # no write-back: gradient zeroing alone
    for ids in data:
        if callback is not None:
            callback.on_step_begin(None, None, None, model=wrapped)
            frozen = callback.frozen
        wrapped(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        if callback is not None:
            callback.on_optimizer_step(None, None, None)
        opt.zero_grad(set_to_none=True)
        report["steps"].append(check(wrapped, init, region))
    report["frozen_here"] = frozen.count
    report["moments_at_rest"] = moments_at_rest(opt, frozen)
    if callback is None:
        attached.remove()
    else:
        callback.on_train_end(None, None, None)
    return {n: whole(p) for n, p in freezing.named_parameters(wrapped).items() if n in init}


def moments_at_rest(opt, frozen) -> bool:
    """Whether AdamW's first and second moments are exactly zero at every frozen entry: the gradients
    the optimizer saw there were zero at every step (so they took no part in clipping either)."""
    ok = True
    for p, index, _ in frozen._entries:
        state = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            m = freezing._local(state[key]).reshape(-1)[index]
            ok &= bool(torch.equal(m, torch.zeros_like(m)))
    return ok


def mapping_checks(model, region: Region) -> dict:
    """Each frozen DTensor parameter: the local indices `freeze` computes against a direct computation,
    a DTensor of the global flat indices laid out like the parameter, whose local shard says which global
    entry each local position holds."""
    from torch.distributed.tensor import distribute_tensor

    params = freezing.named_parameters(model)
    out = {"agree": True, "uneven": [], "count": 0}
    for n in region.packed:
        p = params[n]
        index = region.indices(n)
        which, local = freezing._shard_of(p, index)
        numbers = torch.arange(p.numel()).reshape(p.shape)
        held = distribute_tensor(numbers, p.device_mesh, p.placements).to_local().reshape(-1)
        position = torch.full((p.numel(),), -1, dtype=torch.int64)
        position[held] = torch.arange(len(held))
        direct = position[index]
        out["agree"] &= torch.equal(which, direct >= 0) and torch.equal(local, direct[direct >= 0])
        out["count"] += len(local)
        if p.shape[0] % dist.get_world_size():
            out["uneven"].append(n)
    return out


def run_trainer(engine: str, model, region: Region, init: dict, report: dict, folder: Path) -> dict:
    """HF Trainer with FreezeCallback; Trainer's accelerate state joins the process group and wraps the
    model in DDP when WORLD_SIZE > 1."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Check(TrainerCallback):
        # on_step_end comes after FreezeCallback's write-back (on_optimizer_step), so it sees the step's result.
        def on_step_end(self, args, state, control, model=None, **kwargs):
            report["steps"].append(check(model, init, region))

    # One dataset on every rank (Trainer's sampler gives each rank its part): all ranks' batches.
    everything = [ids for r in range(report["size"]) for ids in batches(r, model.config.vocab_size)]
    rows = [{"input_ids": ids[i], "labels": ids[i]} for ids in everything for i in range(BATCH)]
    args = TrainingArguments(
        output_dir=str(folder / "trainer"),
        max_steps=STEPS // 2,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        weight_decay=WEIGHT_DECAY,
        warmup_steps=0,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **(FSDP_TRAINER if engine == "trainer-fsdp" else {}),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        callbacks=[freezing.FreezeCallback(region), Check()],
    )
    trainer.train()
    report["wrapped"] = type(trainer.model_wrapped).__name__
    report["dtensor"] = any(hasattr(p, "device_mesh") for p in trainer.model_wrapped.parameters())
    report["size"] = trainer.args.world_size
    return {n: whole(p) for n, p in freezing.named_parameters(model).items() if n in init}


if __name__ == "__main__":
    main()
