"""The paper's experiments, one module each, named after the experiment, and the helpers two of them share.

`registry` lists the experiments in the order they run; `training` (further pre-training, for recovery and
forgetting) and `ranking` (for structural and outliers) hold what two experiments share, so that no
experiment imports another. Each experiment composes corpus → scoring → regions → interventions →
evaluation through the run folder (`lingregion.run.Run`) and returns a result that is saved as
results/NAME-summary.json, from which its report section is rebuilt.
"""
