"""The search space of one swept key (a sweep file's ``space`` entries and PBT's ``hyperparam_mutations``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator


class Distribution(BaseModel):
    """The search space of one key: exactly one of ``grid``, ``choice``, ``uniform`` or ``loguniform``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    grid: list[Any] | None = Field(None, min_length=1, description="every value, one trial each (tune.grid_search)")
    choice: list[Any] | None = Field(None, min_length=1, description="one value drawn per sample (tune.choice)")
    uniform: tuple[FiniteFloat, FiniteFloat] | None = Field(None, description="[low, high], drawn uniformly "
                                                                               "(tune.uniform)")
    loguniform: tuple[FiniteFloat, FiniteFloat] | None = Field(None, description="[low, high] > 0, uniform in log "
                                                                                  "space")

    @model_validator(mode="after")
    def _one_distribution(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform "
                             f"(got {', '.join(given) or 'none'})")
        for name in ("uniform", "loguniform"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: [low, high] needs low < high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0 (got {self.loguniform[0]:g})")
        return self

    def domain(self) -> Any:
        """The Tune search-space object."""
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)

    def probes(self) -> list[Any]:
        """The values checked against the experiment before the sweep: every listed value, both ends of a range."""
        return list(self.grid or self.choice or self.uniform or self.loguniform)

    def mutation(self) -> Any:
        """What PBT's hyperparam_mutations takes: the list of a choice, else the Tune domain."""
        return list(self.choice) if self.choice is not None else self.domain()
