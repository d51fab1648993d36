"""iMAML trainer: distributed implicit MAML in JAX (README.md).

jaxopt (pinned, unmaintained: pyproject.toml) warns when imported; the warning is filtered here, once, for
the package and everything that imports it (the CLI, tests, benchmarks).
"""

import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
