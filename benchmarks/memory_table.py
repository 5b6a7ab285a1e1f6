"""The README's memory table for LLaMA-2 7B / 13B / 70B, computed by lingregion.memory.estimate.

    python benchmarks/memory_table.py [--seq-len 2048] [--batch-size 1] [--dtype bfloat16] [--model ID_OR_DIR ...]

--model adds rows for any Hugging Face config (a hub id or a local folder; only config.json is read).
"""

from __future__ import annotations

import argparse
import math

from lingregion import memory

GPU = 80e9  # an 80 GB accelerator


def rows(configs: dict, seq_len: int, batch_size: int, dtype: str) -> list[list[str]]:
    out = []
    for name, config in configs.items():
        e = memory.estimate(config, seq_len, batch_size, dtype)
        gb = lambda key, e=e: f"{e[key] / 1e9:,.1f}"  # noqa: E731
        out.append(
            [
                name,
                f"{e['parameters'] / 1e9:.1f}B",
                gb("weights"),
                gb("accumulators"),
                gb("split_halves"),
                gb("activations"),
                f"{(e['output_chunk'] + e['transient_gradient']) / 1e9:.1f}",
                gb("scoring_peak"),
                str(math.ceil(e["scoring_peak"] / GPU)),
                gb("evaluation_peak"),
                str(math.ceil(e["evaluation_peak"] / GPU)),
            ]
        )
    return out


def table(configs: dict, seq_len: int, batch_size: int, dtype: str) -> str:
    head = [
        "Model",
        "Params",
        "Weights",
        "fp32 accumulators",
        "Split halves (12.5% sample)",
        f"Activations ({batch_size}×{seq_len})",
        "Output chunk + one gradient",
        "Scoring total",
        "80 GB GPUs",
        "Evaluation total",
        "80 GB GPUs",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(configs, seq_len, batch_size, dtype)]
    return "\n".join(lines) + f"\n\nGB = 10⁹ bytes; weights in {dtype}; evaluation at the same window and batch.\n"


def main(argv=None) -> None:
    from transformers import AutoConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", action="append", default=[], help="a hub id or folder whose config.json to add")
    args = p.parse_args(argv)
    configs = {f"LLaMA-2 {size}": memory.llama2(size) for size in ("7B", "13B", "70B")}
    configs.update({name: AutoConfig.from_pretrained(name) for name in args.model})
    print(table(configs, args.seq_len, args.batch_size, args.dtype))


if __name__ == "__main__":
    main()
