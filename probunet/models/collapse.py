"""Posterior-collapse detection: the KL and the sample diversity both near zero.

A collapsed Probabilistic U-Net has a posterior equal to its prior (KL ~ 0) and
an f_comb that ignores z: every sample is the same segmentation, the raters'
disagreement is lost. :class:`CollapseMonitor` watches the logged training KL
and the diversity E[d(S,S')] of prior samples on training images; when both stay
under their thresholds for ``patience`` log intervals in a row it reports the
collapse once (with the step and what to try), and records whether the run
came out of it. :func:`diversity_warning` is the evaluation-side check: the
samples' diversity far below the raters' own E[d(Y,Y')].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

ADVICE = ("try train.free_bits=0.5 (a KL floor per latent dimension), train.kl_warmup_steps=500, a lower "
          "train.beta, train.rater=all, or check model.init=he_normal")


@dataclass
class CollapseMonitor:
    """Feed :meth:`update` every logged (step, KL, diversity); read :meth:`report` at the end.

    kl_threshold: KL (nats, batch mean) under which the posterior counts as on the prior.
    diversity_threshold: E[d(S,S')] under which the samples count as identical.
    patience: consecutive log intervals with both under their thresholds.
    """

    kl_threshold: float = 0.05
    diversity_threshold: float = 0.01
    patience: int = 3
    _run: int = 0
    _run_start: Optional[int] = None
    detected_at: Optional[int] = None  # step at which the collapse was first reported
    collapsed_since: Optional[int] = None  # first step of that collapsed stretch
    recovered_at: Optional[int] = None  # first healthy log step after the (last) collapse
    history: list = field(default_factory=list)

    def update(self, step: int, kl: Optional[float], diversity: Optional[float]) -> Optional[str]:
        """Returns a warning message the first time a collapse is seen, else None."""
        if kl is None or diversity is None or not (math.isfinite(kl) and math.isfinite(diversity)):
            return None
        low = kl < self.kl_threshold and diversity < self.diversity_threshold
        if not low:
            if self.detected_at is not None and self._run >= self.patience:
                self.recovered_at = step
            self._run, self._run_start = 0, None
            return None
        if self._run == 0:
            self._run_start = step
        self._run += 1
        if self._run < self.patience:
            return None
        if self._run == self.patience:
            self.history.append(self._run_start)
            self.recovered_at = None
            if self.detected_at is None:
                self.detected_at, self.collapsed_since = step, self._run_start
                return (f"posterior collapse at step {step}: KL {kl:.3g} nat and sample diversity {diversity:.3g} "
                        f"for {self.patience} log intervals since step {self._run_start}; the samples ignore "
                        f"the latent; {ADVICE}")
        return None

    @property
    def collapsed_now(self) -> bool:
        return self._run >= self.patience

    def report(self) -> dict:
        """What ``train_summary.json`` records under ``collapse``."""
        out = {"detected": self.detected_at is not None, "kl_threshold": self.kl_threshold,
               "diversity_threshold": self.diversity_threshold, "patience_log_intervals": self.patience}
        if self.detected_at is None:
            return out
        out.update(detected_at_step=self.detected_at, since_step=self.collapsed_since,
                   collapsed_at_end=self.collapsed_now, recovered_at_step=self.recovered_at,
                   stretches_started_at=list(self.history), message=self.message())
        return out

    def message(self) -> Optional[str]:
        """One line for the end of training, or None when no collapse was seen."""
        if self.detected_at is None:
            return None
        if self.collapsed_now:
            return (f"posterior collapse: the KL and the sample diversity were near zero from step "
                    f"{self.collapsed_since} to the end; the samples are all alike. {ADVICE[0].upper()}{ADVICE[1:]}")
        return (f"posterior collapse from step {self.collapsed_since} (detected at step {self.detected_at}); the "
                f"latent came back in use by step {self.recovered_at}. If the samples look alike, "
                f"{ADVICE}")


def diversity_warning(sample_diversity: Optional[float], rater_diversity: Optional[float],
                      ratio: float = 0.5) -> Optional[str]:
    """A one-line warning when the samples' E[d(S,S')] is under ``ratio`` x the raters' E[d(Y,Y')]."""
    if sample_diversity is None or rater_diversity is None:
        return None
    if not (math.isfinite(sample_diversity) and math.isfinite(rater_diversity)) or rater_diversity <= 0:
        return None
    if sample_diversity >= ratio * rater_diversity:
        return None
    return (f"the samples are far less diverse than the raters: E[d(S,S')] {sample_diversity:.4f} vs. the raters' "
            f"E[d(Y,Y')] {rater_diversity:.4f} (under {ratio:g}x); the model may have collapsed to one "
            f"segmentation (see train_summary.json 'collapse')")
