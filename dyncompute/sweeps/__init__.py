"""Sweeps: gin grids of cells run on submitit from an ignite engine, and the reports built from their files.

``spec`` (sweep files -> cells), ``cell`` (train -> evaluate -> count -> result.json), ``evaluate``
(the metrics), ``compute`` (the compute columns), ``executors`` (submitit), ``grid`` (the engine and
`dyncompute sweep`), ``report`` (`dyncompute report`).
"""
