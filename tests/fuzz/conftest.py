"""Make the fuzz inputs the same in every run, whatever ran before them.

`derandomize=True` fixes hypothesis's seed, but hypothesis also mixes in constants it reads from
every local module imported so far (`hypothesis.internal.conjecture.providers._get_local_constants`,
a private function), so the inputs would change with test order, with `-k`, and with any edit to
dtcollie. With that pool empty, each test draws the same inputs for the same test code.
"""

import pytest
from hypothesis.internal.conjecture import providers


@pytest.fixture(scope="session", autouse=True)
def no_local_constants():
    original = providers._get_local_constants
    providers._get_local_constants = lambda: providers.Constants()
    yield
    providers._get_local_constants = original
