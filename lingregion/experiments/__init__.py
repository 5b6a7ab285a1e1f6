"""The paper's experiments, one module each, named after the experiment.

`registry` lists them in the order they run; `runfolder` is the resumable run folder they share. Each
module composes corpus → scoring → regions → interventions → evaluation and returns a result that is
saved as results/NAME-summary.json, from which its report section is rebuilt.
"""
