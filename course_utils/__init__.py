"""course_utils: the small shared helper package of the fine-tuning course.

Each module holds one concept. Techniques taught in a notebook are exported
from that notebook's `#| export` cells (see `course_utils.export`), so the
package and the notebook can never drift apart unnoticed.
"""

__version__ = "0.1.0"
