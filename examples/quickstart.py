# %% [markdown]
# # lingregion quick start: load, score, locate, remove, evaluate, plot
#
# Run it as a script (`python examples/quickstart.py [OUT_DIR]`, about 1-2 minutes on a laptop CPU) or
# cell by cell in a notebook (the `# %%` markers are Jupyter/VS Code cells). The budgets are tiny so that
# it runs anywhere; raise TOKENS and ITEMS (and use `device="cuda"`) for numbers worth reporting.

# %%
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt

from lingregion import corpus, evaluation, export, figures, interventions, models, scoring, tasks
from lingregion.regions import select

OUT = Path(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "quickstart-out")
SCORE_LANGS = ["ru", "zh"]  # languages whose importance is summed into the core score
EVAL_LANGS = ["ru", "zh", "en"]  # en is not scored: does removing the core region hurt it too?
TOKENS, SEQ_LEN, ITEMS = 512, 256, 8

# %% [markdown]
# ## 1. Load a model
# The built-in default is Gemma 3 270M (converted once from its packaged GGUF); any Hugging Face causal LM
# id or folder works: `models.load("Qwen/Qwen2-0.5B", dtype="bfloat16", device="cuda")`.

# %%
m = models.load()
names = models.scored_names(m.module)  # every parameter inside a transformer layer
removed = models.removed_values(m.module, names)  # what "removed" means per parameter (0, or -1 for (1+w) norms)
print(m.info["class"], f"{m.info['parameters']:,} parameters, {len(names)} scored tensors")

# %% [markdown]
# ## 2. Score: first-order Taylor importance |θ ⊙ ∂L/∂θ| per language, summed over languages

# %%
core_scores = {}
for lang in SCORE_LANGS:
    windows = corpus.load_windows(m.tokenizer, lang, "score", seq_len=SEQ_LEN, max_tokens=TOKENS)
    scoring.accumulate(core_scores, scoring.score(m.module, windows, names, removed))

# %% [markdown]
# ## 3. Locate: the Top 1% of each matrix is the core region; a Random 1% is the control

# %%
top = select(core_scores, 0.01, "top", meta={"languages": SCORE_LANGS, "model": m.info["fingerprint"]})
random = select(core_scores, 0.01, "random", seed=0, meta={"model": m.info["fingerprint"]})
print(f"Top region: {top.count():,} of {top.total():,} entries; overlap with Random: {top.jaccard(random):.3f}")
top.save(OUT / "regions" / "core-top-0.01.safetensors")

# %% [markdown]
# ## 4. Remove and evaluate: perplexity and the built-in multiple-choice task, per setting
# `interventions.applied` sets the region to its removed value and restores it bit for bit on exit.

# %%
results = {}
for setting, region in [("base", None), ("top 1%", top), ("random 1%", random)]:
    edits = interventions.removal(region, removed) if region else []
    with interventions.applied(m.module, edits):
        for lang in EVAL_LANGS:
            w = corpus.load_windows(m.tokenizer, lang, "eval", seq_len=SEQ_LEN, max_tokens=SEQ_LEN)
            ppl = evaluation.perplexity(m.module, w, progress=False)["ppl"]
            mc = tasks.evaluate(m.module, m.tokenizer, lang, limit=ITEMS)
            results[setting, lang] = (ppl, mc["acc"])
            print(f"{setting:>10} {lang}: perplexity {ppl:10.1f}   accuracy {mc['acc']:.0%} (chance 25%)")

# %% [markdown]
# Any lm-eval task runs the same way on the model object, region removed, nothing written to disk
# (`pip install lm-eval`; tasks like MMLU need their datasets):
#
#     with interventions.applied(m.module, interventions.removal(top, removed)):
#         print(tasks.lmeval(m.module, m.tokenizer, ["lingregion_udhr_next_ru"], limit=ITEMS))

# %% [markdown]
# ## 5. Plot: where the region sits, and what removing it does

# %%
(OUT / "region-grid.png").write_bytes(figures.region_grid(top))
fig, ax = plt.subplots(figsize=(6, 3.5))
settings = ["base", "top 1%", "random 1%"]
for i, setting in enumerate(settings):
    ax.bar(
        [j + 0.27 * (i - 1) for j in range(len(EVAL_LANGS))],
        [100 * results[setting, lang][1] for lang in EVAL_LANGS],
        0.27,
        label=setting,
    )
ax.axhline(25, color="black", ls="--", lw=1, label="chance")
ax.set(
    xticks=range(len(EVAL_LANGS)),
    xticklabels=EVAL_LANGS,
    ylabel="accuracy (%)",
    ylim=(0, 100),
    title=f"udhr_next, {ITEMS} items per language",
)
ax.legend(frameon=False, fontsize=8)
(OUT / "accuracy.png").write_bytes(figures.png(fig))
print(f"figures: {OUT / 'region-grid.png'}, {OUT / 'accuracy.png'}")

# %% [markdown]
# ## 6. Export the region-removed model as a plain Hugging Face folder (with a model card)
# The same as `lingregion export --remove OUT/regions/core-top-0.01.safetensors --out OUT/model-top1`.

# %%
if "--export" in sys.argv:
    record = {
        **export.region_record(top, OUT / "regions" / "core-top-0.01.safetensors", m.module, removed),
        "base_model": m.info,
    }
    path = export.export(
        m.module, m.tokenizer, OUT / "model-top1", interventions.removal(top, removed), record, force=True
    )
    print(f"exported: {path} (README.md says what was removed)")
