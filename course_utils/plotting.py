"""One plotting style for the whole course, so figures read alike."""

import matplotlib as mpl

# Colour-blind-safe palette (Okabe-Ito), in a fixed order so that the same
# method keeps the same colour across notebooks.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def use_course_style() -> None:
    """Apply the course's matplotlib style (call once per notebook)."""
    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 3.6),
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titleweight": "bold",
            "axes.prop_cycle": mpl.cycler(color=PALETTE),
            "legend.frameon": False,
            "font.size": 10,
        }
    )
