"""The evaluation protocols of the evaluate stage, one module per protocol.

`features` (labelled splits in memory, frozen features, the feature cache), `probes`
(linear probe, low-label subsets, label noise), `fewshot`, `supervised` (the from-scratch
baseline), `robustness` (corruptions, FGSM, PGD) and `plots`; kNN is `moco.knn` (the monitor's
too). `pipeline.evaluate` runs them.
Every protocol works on tensors, so each can be checked against a case with a known answer.
"""
