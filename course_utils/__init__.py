"""course_utils: the small shared helper package of the fine-tuning course.

Each module holds one concept. Techniques taught in a notebook are exported
from that notebook's `#| export` cells (see `course_utils.tools.export`), so the
package and the notebook can never drift apart unnoticed.
"""

__version__ = "0.1.0"


def _quiet_bitsandbytes_import() -> None:
    """bitsandbytes on AVX512-BF16 CPUs logs, at import, that an optional Hub kernel is missing (it would need
    internet and the `kernels` package); its own fallback works. Filtered here, before any module imports it."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record):
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(type(f).__name__ == "_Drop" for f in logger.filters):
        logger.addFilter(_Drop())


_quiet_bitsandbytes_import()
