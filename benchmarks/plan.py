"""What a benchmark run measures: scenarios, load points, repeats, durations.

Pure data, built by `benchmarks.cli` from the command line and consumed by
`benchmarks.runner`. `schedule()` is the ABAB order: for every cell and every
repeat, each configuration once, always in the same order, so slow drift of a
shared machine hits all configurations alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from benchmarks import sidecar


@dataclass(frozen=True)
class Scenario:
    """Where the client sends its requests and which paths it cycles through."""

    name: str
    pod: str
    paths: tuple[str, ...] = ()
    envoy_share: float | None = None  # designed share of routes that need Envoy
    description: str = ""
    demo: bool = False  # runs on the project's demo mesh (compose/demo) instead of the bench pods

    @property
    def path(self) -> str:
        return self.paths[0] if self.paths else "/"


def mix(share: float) -> Scenario:
    pct = round(share * 100)
    n = sidecar.MIX_ROUTES[share]
    return Scenario(f"policy-mix-{pct}", sidecar.mix_service(share),
                    tuple(sidecar.policy_paths(share)), share,
                    f"service {sidecar.mix_service(share)}: {n} routes, "
                    f"{len(sidecar.envoy_only_indexes(n, share))} of them need Envoy")


SCENARIOS = {s.name: s for s in (
    Scenario("leaf", "leaf", description="single hop: client -> leaf service"),
    Scenario("multihop", "frontend",
             description="two hops: client -> frontend -> backend (the frontend calls the backend)"),
    *(mix(share) for share in sidecar.MIX_SHARES),
    Scenario("demo", "frontend", ("/home",), demo=True,
             description="the demo mesh (compose/demo): client -> frontend /home -> "
                         "home-timeline (-> post-storage, social-graph) and user (canary 90/10)"),
)}


@dataclass(frozen=True)
class Cell:
    """One measurement point: a scenario under closed-loop (wrk) or rate-limited (h2load) load."""

    scenario: Scenario
    connections: int
    rate: float | None = None  # offered req/s for the open-loop sweep, None = closed loop

    @property
    def label(self) -> str:
        load = f"{self.rate:.0f} req/s offered" if self.rate else "closed loop"
        return f"{self.scenario.name} c={self.connections} {load}"


@dataclass
class Plan:
    cells: list[Cell]
    repeats: int
    duration_s: float
    warmup_s: float
    quick: bool = False
    sweep_connections: int = 16
    notes: list[str] = field(default_factory=list)

    def schedule(self, configurations: list[str]) -> Iterator[tuple[Cell, int, str]]:
        """ABAB order: cell by cell, repeat by repeat, every configuration in turn."""
        for cell in self.cells:
            for rep in range(self.repeats):
                for name in configurations:
                    yield cell, rep, name

    def total(self, configurations: list[str]) -> int:
        return len(self.cells) * self.repeats * len(configurations)


def build_plan(*, quick: bool, scenarios: list[str] | None = None, repeats: int | None = None,
               duration_s: float | None = None, rates: list[float] | None = None) -> Plan:
    """The full plan, or the `--quick` one (one short repetition, fewer points)."""
    # the demo brings up a 13-pod mesh per configuration: full runs only, unless asked for
    names = scenarios or [n for n in SCENARIOS if not (quick and SCENARIOS[n].demo)]
    unknown = [n for n in names if n not in SCENARIOS and n != "sweep"]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}; choose from "
                         f"{', '.join([*SCENARIOS, 'sweep'])}")
    if scenarios is None:
        names.append("sweep")
    conns = [1, 16] if quick else [1, 16, 64]
    cells: list[Cell] = []
    for name in names:
        if name == "sweep":
            continue
        sc = SCENARIOS[name]
        if sc.envoy_share is not None:  # the policy mix: one load point, enough connections
            cells.append(Cell(sc, 16))
        elif sc.demo:
            cells += [Cell(sc, c) for c in ([16] if quick else [1, 16])]
        elif quick and name != "leaf":
            cells.append(Cell(sc, 16))
        else:
            cells += [Cell(sc, c) for c in conns]
    if "sweep" in names:
        sweep_rates = rates or ([500.0, 2000.0] if quick else
                                [500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0])
        cells += [Cell(SCENARIOS["leaf"], 16, r) for r in sweep_rates]
    return Plan(cells=cells, repeats=repeats or (1 if quick else 3),
                duration_s=duration_s or (1.0 if quick else 5.0),
                warmup_s=0.0 if quick else 1.0, quick=quick)
