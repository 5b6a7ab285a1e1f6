"""lingregion: find and test the linguistic regions of large language models.

Data flows one way: corpus (text → token windows) → scoring (importance per parameter) → regions
(scores → packed bit masks) → interventions (apply a region, undo it exactly) → evaluation (perplexity,
bits per byte, generation) → experiments (one module per paper experiment) → report.

The verbs below are the notebook API; `lingregion.<module>` holds the machinery behind each.
"""

from .api import applied, core, generate, locate, monolingual, perplexity, plot, removed, score, train, windows
from .config import Config
from .models import Model, load
from .regions import Region
from .version import __version__

__all__ = [
    "Config",
    "Model",
    "Region",
    "__version__",
    "applied",
    "core",
    "generate",
    "load",
    "locate",
    "monolingual",
    "perplexity",
    "plot",
    "removed",
    "reproduce",
    "score",
    "train",
    "windows",
]


def __getattr__(name: str):
    # `reproduce` imports every experiment: only when it is asked for, so that `lingregion score` and the
    # other single-step commands load none of them
    if name == "reproduce":
        from .pipeline import reproduce

        return reproduce
    raise AttributeError(f"module 'lingregion' has no attribute {name!r}")
