"""Training: :func:`fit` (:mod:`.trainer`) with one optimizer step (:mod:`.step`), the weight
average (:mod:`.ema`) and the NaN guard (:mod:`.nonfinite`).

``probunet.train.fit`` loads the trainer on first use: importing a part (``probunet.train.step``)
does not load it.
"""

__all__ = ["Trainer", "TrainingError", "fit"]


def __getattr__(name: str):
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'probunet.train' has no attribute {name!r}")
