"""lingregion: find and test the linguistic regions of large language models.

Data flows one way: corpus (text → token windows) → scoring (importance per parameter) → regions
(scores → packed bit masks) → interventions (apply a region, undo it exactly) → evaluation (perplexity,
bits per byte) → experiments (one function per paper experiment) → report.
"""
__version__ = "0.1.0"
