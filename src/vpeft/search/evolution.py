"""Evolutionary search of subnets under a trainable-parameter budget (NOAH / GLoRA / AutoFormer style).

The loop of the official NOAH and GLoRA searchers (``EvolutionSearcher``): a first population of random
candidates; then, for ``generations`` rounds, the ``select`` best candidates seen so far are parents of
``mutation`` mutated and ``crossover`` crossed-over children, and random candidates fill the population up again.
Every candidate is evaluated once (on the validation split); a candidate seen before is skipped.

The budget is a hard constraint checked with the space's exact parameter count. Unlike the official code, which
rejects (and redraws) candidates over the budget -- under a small budget it then practically never finds a random
legal candidate -- a candidate over the budget is *repaired*: random parts are shrunk one step at a time until it
fits (:meth:`~vpeft.search.spaces.SearchSpace.shrink`).
Ranking: validation top-1, then lower validation loss, then fewer parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError
from .space import Cand, SearchSpace

__all__ = ["EvolutionConfig", "Evaluated", "SearchResult", "evolve", "repair"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """Evolution settings; the defaults are the official searchers' (NOAH's VTAB script runs 15 generations).

    Attributes:
        population: candidates per generation.
        generations: rounds of mutation + crossover after the first population.
        select: parents kept (the best seen so far).
        mutation: mutated children per round (default: half the population).
        crossover: crossed-over children per round (default: half the population).
        m_prob: mutation probability (per module depth / per block / per support tensor).
        s_prob: NOAH's probability of resampling a module's depth when it mutates.
        seed: seeds the search's random generator.
    """

    population: int = 50
    generations: int = 20
    select: int = 10
    mutation: int | None = None
    crossover: int | None = None
    m_prob: float = 0.2
    s_prob: float = 0.4
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("population", 1), ("generations", 0), ("select", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"search: {name}={value!r} is invalid; expected an integer >= {low}")
        for name in ("mutation", "crossover"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, self.population // 2)
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"search: {name}={value!r} is invalid; expected an integer >= 0")
        for name in ("m_prob", "s_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ConfigError(f"search: {name}={value!r} is invalid; expected a probability in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """One evaluated candidate."""

    cand: Cand
    params: int
    top1: float
    loss: float
    generation: int
    origin: str

    @property
    def key(self) -> tuple[float, float, int]:
        return (self.top1, -self.loss, -self.params)


@dataclasses.dataclass
class SearchResult:
    """The best candidate, every evaluated candidate in order, and the final parents."""

    best: Evaluated
    history: list[Evaluated]
    top: list[Evaluated]


def repair(space: SearchSpace, cand: Cand, budget: int, rng: random.Random) -> Cand:
    """Shrink random parts of ``cand`` until it fits ``budget`` (exact count)."""
    while space.params(cand) > budget:
        smaller = space.shrink(cand, rng)
        if smaller is None:
            raise ConfigError(f"budget {budget:,} is below the smallest candidate ({space.min_params():,} parameters)")
        cand = smaller
    return cand


def evolve(
    space: SearchSpace,
    evaluate: Callable[[Cand], Mapping[str, float]],
    budget: int,
    cfg: EvolutionConfig | None = None,
    *,
    progress: bool = True,
) -> SearchResult:
    """Search ``space`` for the candidate with the best ``evaluate(cand)["top1"]`` within ``budget`` parameters.

    Args:
        space: the search space.
        evaluate: returns ``{"top1": ..., "loss": ...}`` of a candidate (e.g. its supernet slice on val200).
        budget: the largest allowed trainable-parameter count (head excluded).
        cfg: evolution settings.
        progress: show a progress bar over evaluations.

    Raises:
        ConfigError: the budget is below the smallest candidate.
    """
    cfg = cfg or EvolutionConfig()
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"search: budget={budget!r} is invalid; expected a parameter count >= 0")
    if space.min_params() > budget:
        raise ConfigError(f"budget {budget:,} is below the smallest candidate ({space.min_params():,} parameters)")
    evo = _Evolution(space, evaluate, budget, cfg, random.Random(cfg.seed))
    bar = tqdm(total=cfg.population * (cfg.generations + 1), desc="search", disable=not progress, leave=False)
    evo.bar = bar
    try:
        evo.produce(evo.random, cfg.population, "random", 0, 100 * cfg.population)
        for gen in range(1, cfg.generations + 1):
            evo.generation(gen)
    finally:
        bar.close()
    ranked = sorted(evo.seen.values(), key=lambda r: r.key, reverse=True)
    return SearchResult(best=ranked[0], history=evo.history, top=ranked[: cfg.select])


class _Evolution:
    """The state of one :func:`evolve` call: every evaluated candidate, in order and by value."""

    def __init__(self, space: SearchSpace, evaluate, budget: int, cfg: EvolutionConfig, rng: random.Random):
        self.space, self.evaluate, self.budget, self.cfg, self.rng = space, evaluate, budget, cfg, rng
        self.seen: dict[Cand, Evaluated] = {}
        self.history: list[Evaluated] = []
        self.bar: Any = None

    def consider(self, cand: Cand, origin: str, gen: int) -> bool:
        """Evaluate ``cand`` (repaired into the budget) unless it was seen; whether it was new."""
        cand = repair(self.space, cand, self.budget, self.rng)
        if cand in self.seen:
            return False
        metrics = self.evaluate(cand)
        rec = Evaluated(cand, self.space.params(cand), float(metrics["top1"]), float(metrics["loss"]), gen, origin)
        self.seen[cand] = rec
        self.history.append(rec)
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(best=f"{max(r.top1 for r in self.seen.values()):.3f}")
        return True

    def produce(self, make: Callable[[], Cand], n: int, origin: str, gen: int, tries: int) -> int:
        """Evaluate up to ``n`` new candidates from ``make``, within ``tries`` draws; how many were new."""
        made = attempts = 0
        while made < n and attempts < tries:
            attempts += 1
            made += self.consider(make(), origin, gen)
        return made

    def random(self) -> Cand:
        return self.space.random(self.rng)

    def generation(self, gen: int) -> None:
        """Mutations and crossovers of the ``select`` best so far, topped up with random candidates."""
        cfg, rng, space = self.cfg, self.rng, self.space
        parents = [r.cand for r in sorted(self.seen.values(), key=lambda r: r.key, reverse=True)[: cfg.select]]

        def mutant() -> Cand:
            return space.mutate(rng.choice(parents), rng, cfg.m_prob, cfg.s_prob)

        def child() -> Cand:
            return space.crossover(rng.choice(parents), rng.choice(parents), rng)

        made = self.produce(mutant, cfg.mutation, "mutation", gen, 10 * cfg.mutation)
        made += self.produce(child, cfg.crossover, "crossover", gen, 10 * cfg.crossover)
        self.produce(self.random, max(cfg.population - made, 0), "random", gen, 100 * cfg.population)
        best = max(self.seen.values(), key=lambda r: r.key)
        log.info(
            "generation %d: %d evaluated, best top-1 %.4f (%d params)", gen, len(self.seen), best.top1, best.params
        )


def record(rec: Evaluated, space: SearchSpace) -> dict[str, Any]:
    """A JSON record of an evaluated candidate (its exported config included)."""
    return {
        "generation": rec.generation,
        "origin": rec.origin,
        "params": rec.params,
        "val_top1": rec.top1,
        "val_loss": rec.loss,
        "config": space.to_json(rec.cand),
    }
