"""A sweep's trial scheduler (the sweep file's ``scheduler`` section) and what PBT may perturb.

``scheduler: {name: fifo}`` (the default) runs every trial to its budget. ``asha`` (Tune's ASHAScheduler) stops
trials whose ``metric`` trails the others at each rung; ``pbt`` (PopulationBasedTraining) replaces a trailing trial's
state with a better trial's checkpoint (restored through the run's ``--resume`` path) and perturbs the keys of
``hyperparam_mutations``. Times (``grace_period``, ``max_t``, ``perturbation_interval``, ``burn_in_period``) count
in ``time_attr``: ``env_steps`` (the default) or ``training_iteration`` (log intervals: one report per
``log_every_steps``). ``max_t`` (the last rung) defaults to the experiment's ``total_env_steps`` (in env steps) or
to its number of log intervals; a trial that is not stopped runs to its budget either way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

from softflow.deploy.sweep.distributions import Distribution

# What PBT may perturb: keys the checkpoint does not pin. The learning rates are set from the config at every
# learner call (the schedule of lr_final_fraction) and alpha_lr and a fixed alpha when a checkpoint loads
# (algorithms/base.py); candidates only steer acting. A restore from another trial may also bring its seed.
PBT_KEYS = ("algorithm.q_lr", "algorithm.policy_lr", "algorithm.alpha", "algorithm.alpha_lr", "actors.candidates")
PBT_RESUMABLE = (*PBT_KEYS, "seed")
_ONLY = {"asha": ("grace_period", "reduction_factor", "max_t"),
         "pbt": ("perturbation_interval", "burn_in_period", "hyperparam_mutations", "quantile_fraction",
                 "resample_probability", "perturbation_factors")}


class SchedulerConfig(BaseModel):
    """The ``scheduler`` section of a sweep file (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Literal["fifo", "asha", "pbt"] = "fifo"
    time_attr: Literal["env_steps", "training_iteration"] = Field(
        "env_steps", description="what the times below count: env steps, or log intervals (training_iteration)")
    grace_period: int | None = Field(None, ge=1, description="asha: the first rung (default 1 log interval)")
    reduction_factor: FiniteFloat | None = Field(None, gt=1, description="asha: default 4")
    max_t: int | None = Field(None, ge=1, description="asha: the last rung (default the whole budget)")
    perturbation_interval: int | None = Field(None, ge=1, description="pbt: time between exploits (required)")
    burn_in_period: int | None = Field(None, ge=0, description="pbt: no exploit before this time (default 0)")
    hyperparam_mutations: dict[str, Distribution] | None = Field(
        None, description="pbt: key -> choice, uniform or loguniform (keys of PBT_KEYS)")
    quantile_fraction: FiniteFloat | None = Field(None, ge=0, le=0.5, description="pbt: default 0.25")
    resample_probability: FiniteFloat | None = Field(None, ge=0, le=1, description="pbt: default 0.25")
    perturbation_factors: tuple[FiniteFloat, FiniteFloat] | None = Field(None, description="pbt: default (1.2, 0.8)")

    @model_validator(mode="after")
    def _check(self) -> SchedulerConfig:
        for name, fields in _ONLY.items():
            given = [f for f in fields if getattr(self, f) is not None]
            if given and self.name != name:
                raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to "
                                 f"scheduler {name} only (this one is {self.name})")
        if self.name == "pbt":
            if self.perturbation_interval is None:
                raise ValueError("pbt needs perturbation_interval (in time_attr units, e.g. 10000 env steps)")
            if not self.hyperparam_mutations:
                raise ValueError(f"pbt needs hyperparam_mutations over some of {', '.join(PBT_KEYS)}")
            for key, dist in self.hyperparam_mutations.items():
                if key not in PBT_KEYS:
                    raise ValueError(f"hyperparam_mutations: PBT cannot perturb {key} (a restored checkpoint pins "
                                     f"it); use some of {', '.join(PBT_KEYS)}")
                if dist.grid is not None:
                    raise ValueError(f"hyperparam_mutations.{key}: use choice, uniform or loguniform (not grid)")
        return self


def build_scheduler(config: SchedulerConfig, metric: str, mode: str, budget: int, log_every: int) -> Any:
    """The Tune scheduler; ``budget`` and ``log_every``: the experiments' largest total_env_steps and their
    smallest log_every_steps (for the default ``max_t``)."""
    from ray import tune

    if config.name == "fifo":
        return tune.schedulers.FIFOScheduler()
    if config.name == "asha":
        intervals = -(-budget // log_every)
        default_max = budget if config.time_attr == "env_steps" else intervals
        return tune.schedulers.ASHAScheduler(
            time_attr=config.time_attr, metric=metric, mode=mode, max_t=config.max_t or default_max,
            grace_period=config.grace_period or (log_every if config.time_attr == "env_steps" else 1),
            reduction_factor=config.reduction_factor or 4, stop_last_trials=False)  # trials end at their budget
    return tune.schedulers.PopulationBasedTraining(
        time_attr=config.time_attr, metric=metric, mode=mode, perturbation_interval=config.perturbation_interval,
        burn_in_period=config.burn_in_period or 0,
        hyperparam_mutations={k: d.mutation() for k, d in config.hyperparam_mutations.items()},
        quantile_fraction=config.quantile_fraction if config.quantile_fraction is not None else 0.25,
        resample_probability=config.resample_probability if config.resample_probability is not None else 0.25,
        perturbation_factors=config.perturbation_factors or (1.2, 0.8), require_attrs=False)
