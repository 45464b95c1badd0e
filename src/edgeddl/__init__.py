"""edgeddl: distributed deep learning on IoT and edge fleets, simulated or real.

`edgeddl.run(config, model=..., train_set=..., test_set=...)` trains a scenario on the
simulated fleet and returns its run folder and summary.
"""

from typing import Any

from edgeddl.config.loader import ConfigError, load_scenario
from edgeddl.config.schema import Scenario

__all__ = ["ConfigError", "RunResult", "Scenario", "load_scenario", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The training loop pulls in torch; loading or validating a scenario should not.
    if name in ("run", "RunResult"):
        from edgeddl.runtime.sim import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'edgeddl' has no attribute {name!r}")
