"""nbval settings for the committed notebooks (`make test-notebooks`)."""

from __future__ import annotations

import pytest

OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """nbval waits at most 5 s between a cell's output messages once the cell has finished. On a
    loaded 2-core CI machine, notebook 07's long evaluation cell (8 variants x 6 settings through
    mteb) was once failed by that wait although the cell completed; a longer wait changes nothing
    else (the cell's own timeout, --nbval-cell-timeout, still applies)."""
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = OUTPUT_TIMEOUT_S
