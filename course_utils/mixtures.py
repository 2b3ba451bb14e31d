"""Multi-task mixtures: a sampler that mixes task data sets with given weights or by temperature sampling.

Built in notebooks/05_packing_masks.ipynb, where packed batches are drawn from it and the per-task token shares
are measured against the requested weights.

    weights = temperature_weights({"reverse": 2000, "add": 400}, temperature=3.33)  # p_i ~ n_i^(1/T)
    sampler = MixtureSampler({"reverse": rows_a, "add": rows_b}, weights, seed=0)
    for task, example in sampler.take(100): ...
"""

# Exported from notebooks/05_packing_masks.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/05_packing_masks.ipynb · 3.4 · Multi-task mixtures
import itertools
import math
import random

from course_utils.errors import CourseError


def temperature_weights(sizes: dict, temperature: float) -> dict[str, float]:
    """p_i ~ n_i^(1/T): T = 1 is proportional to size, larger T flattens towards uniform (T = inf: uniform)."""
    check_sizes(sizes, temperature)
    powered = {name: n ** (1 / temperature) for name, n in sizes.items()}
    total = sum(powered.values())
    return {name: p / total for name, p in powered.items()}


class MixtureSampler:
    """Endless (task, example) pairs: a task drawn with its weight, then that task's next example.

    Each task's examples are visited in a shuffled order, reshuffled whenever the task runs out. The same seed
    gives the same stream.
    """

    def __init__(self, datasets: dict, weights: dict, *, seed: int = 0):
        self.datasets = check_datasets(datasets)
        self.weights = check_weights(weights, datasets)
        self.seed = seed

    def __iter__(self):
        rng = random.Random(self.seed)
        names = list(self.datasets)
        probabilities = [self.weights[name] for name in names]
        queues = {name: [] for name in names}
        while True:
            name = rng.choices(names, weights=probabilities)[0]
            if not queues[name]:
                order = list(range(len(self.datasets[name])))
                rng.shuffle(order)
                queues[name] = order[::-1]  # pop() from the end takes them in shuffled order
            yield name, self.datasets[name][queues[name].pop()]

    def take(self, n: int) -> list:
        """The first n (task, example) pairs of the stream."""
        return list(itertools.islice(iter(self), n))


# %% notebooks/05_packing_masks.ipynb · 3.4 · Multi-task mixtures
def check_weights(weights: dict, names=None) -> dict[str, float]:
    """The weights as floats, after checking them: non-negative, summing to 1, one per data set in `names`."""
    if not weights:
        raise CourseError("The mixture has no weights: pass {task name: weight}, e.g. {'reverse': 0.5, 'add': 0.5}.")
    weights = {name: float(w) for name, w in weights.items()}
    negative = [name for name, w in weights.items() if not w >= 0 or math.isinf(w)]
    if negative:
        raise CourseError(f"Mixture weights must be finite and >= 0; {negative} are not.")
    total = sum(weights.values())
    if abs(total - 1) > 1e-6:
        fixed = ", ".join(f"{name!r}: {w / total:.3g}" for name, w in weights.items()) if total > 0 else "..."
        raise CourseError(f"The mixture weights sum to {total:.6g}, not 1. Divide each by their sum ({{{fixed}}}), "
                          "or derive them from the data set sizes with temperature_weights(sizes, temperature).")
    if names is not None and set(weights) != set(names):
        raise CourseError(f"The weights name {sorted(weights)} but the data sets are {sorted(names)}: "
                          "give exactly one weight per data set.")
    return weights


def check_sizes(sizes: dict, temperature: float) -> None:
    """temperature_weights' arguments: positive whole data set sizes, a temperature > 0."""
    if not sizes or any(not isinstance(n, int) or n <= 0 for n in sizes.values()):
        raise CourseError(f"temperature_weights needs {{task: number of examples > 0}}, got {sizes!r}.")
    if not temperature > 0:
        raise CourseError(f"temperature={temperature!r} must be > 0 (1 = proportional to size, larger = flatter).")


def check_datasets(datasets: dict) -> dict:
    """At least one data set, none of them empty."""
    if not datasets:
        raise CourseError("MixtureSampler needs at least one data set: {task name: examples}.")
    empty = [name for name, rows in datasets.items() if len(rows) == 0]
    if empty:
        raise CourseError(f"The data sets {empty} are empty: drop them from the mixture or give them examples.")
    return datasets
