"""Tiny models and a tiny tokenizer, built in the test process, for exact checks of the math."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lingregion import Config, corpus, importance
from lingregion import models as lr_models

TEXT = [
    "Quantum mechanics describes nature at the scale of atoms and subatomic particles.",
    "Квантовая механика описывает природу на уровне атомов и субатомных частиц.",
    "La mecánica cuántica describe la naturaleza a escala de átomos y partículas.",
    "量子力学描述原子和亚原子粒子尺度上的自然。",
    "양자 역학은 원자와 아원자 입자 규모의 자연을 설명합니다.",
]
VOCAB = 300


@pytest.fixture(scope="session")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


CONFIGS = {
    "gemma3": lambda: Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    ),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128),
}

# The architecture matrix (tests/test_architectures.py): one tiny config per family, 2 layers, hidden 32.
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the conftest tokenizer's special tokens
MOE = dict(num_experts=4, num_experts_per_tok=2)


def _config(name: str, **kw):
    import transformers

    return getattr(transformers, name)(**kw)


CONFIGS.update(
    {
        "llama3": lambda: _config(
            "LlamaConfig",
            **SMALL,
            **IDS,
            intermediate_size=48,
            num_key_value_heads=1,
            tie_word_embeddings=True,  # as Llama 3.2 1B/3B
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "qwen3": lambda: _config(
            "Qwen3Config", **SMALL, **IDS, intermediate_size=48, num_key_value_heads=1, head_dim=16
        ),
        "mistral": lambda: _config(
            "MistralConfig", **SMALL, **IDS, intermediate_size=48, num_key_value_heads=1, sliding_window=16
        ),
        "phi3": lambda: _config("Phi3Config", **SMALL, **IDS, intermediate_size=48, num_key_value_heads=1),
        "gpt_neox": lambda: _config("GPTNeoXConfig", **SMALL, **IDS, intermediate_size=48),
        "olmo2": lambda: _config("Olmo2Config", **SMALL, **IDS, intermediate_size=48, num_key_value_heads=1),
        "bloom": lambda: _config("BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2, **IDS),
        "mixtral": lambda: _config(
            "MixtralConfig",
            **SMALL,
            **IDS,
            intermediate_size=24,
            num_key_value_heads=1,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "qwen2_moe": lambda: _config(
            "Qwen2MoeConfig",
            **SMALL,
            **IDS,
            **MOE,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_key_value_heads=1,
        ),
        "qwen3_moe": lambda: _config(
            "Qwen3MoeConfig",
            **SMALL,
            **IDS,
            **MOE,
            intermediate_size=48,
            moe_intermediate_size=24,
            head_dim=16,
            num_key_value_heads=1,
        ),
        "olmoe": lambda: _config("OlmoeConfig", **SMALL, **IDS, **MOE, intermediate_size=24, num_key_value_heads=1),
    }
)


def make_model(family: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    with torch.no_grad():  # random norm weights, so that (1 + w) and w norms differ from their init
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.5)
    return model.to(dtype).eval()


def tiny_config(folder, **kw) -> Config:
    """A run of the tiny model saved at `folder`: 16-token windows, 32 tokens per budget, ru and es scored;
    `kw` sets the rest (the experiments, their languages and sizes)."""
    base = {"model": str(folder), "seq_len": 16, "score_tokens": 32, "eval_tokens": 32, "score_langs": ["ru", "es"]}
    return Config(**{**base, **kw})


# further pre-training of the tiny model: three sample counts, a few steps each
TINY_TRAINING = {
    "train_lang": "ru",
    "train_other": "es",
    "train_track": ["es", "zh"],
    "train_ratio": 0.05,
    "train_samples": [0, 2, 6],
    "train_batch": 2,
    "train_warmup": 1,
    "train_lr": 1e-2,
    "train_eval_tokens": 32,
}


@pytest.fixture
def tiny():
    return make_model


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A tiny Gemma 3 saved as a plain HF folder, as a user's --model would be."""
    model = make_model("gemma3")
    path = tmp_path / "tiny-gemma"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def loaded(tokenizer):
    def build(family="gemma3", dtype=torch.float32):
        m = make_model(family, dtype=dtype)
        names = lr_models.scored_names(m)
        return lr_models.Model(
            m,
            tokenizer,
            {"fingerprint": lr_models.fingerprint(m), "name": family},
            names,
            lr_models.removed_values(m, names),
        )

    return build


@pytest.fixture
def bos_tokenizer(tokenizer):
    """The tiny tokenizer, adding BOS as Gemma's does."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    return tok


def long_model(family="gemma3"):
    """A tiny model with room for a paragraph of byte-level tokens (the task's items)."""
    cfg = CONFIGS[family]()
    cfg.max_position_embeddings = cfg.n_positions = 2048
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def lang_windows(tokenizer, texts, lang, seq_len=12):
    """Scoring windows of `texts` as language `lang`, without a budget: every text in short windows."""
    return corpus.make_windows(tokenizer, texts, seq_len, 10_000, lang, "score", "test")


def importance_target(model, include=None):
    """What the importance estimators score on `model`: its scored parameters and their removed values."""
    names = lr_models.scored_names(model, include)
    return importance.Target(model, names, lr_models.removed_values(model, names))
