"""The machine and the files around a run: processes (torchrun), memory, the run directory and
the prediction folder's ownership, and the files shipped with probunet (the example configs).

Nothing here knows a model or a dataset: every stage above may use it.
"""
