"""edgeddl: distributed deep learning on IoT and edge fleets, simulated or real.

`edgeddl.run(config, model=..., train_set=..., test_set=...)` trains a scenario on the
simulated fleet and returns its run folder and summary.
"""

from edgeddl.config.loader import ConfigError, load_scenario
from edgeddl.config.schema import Scenario
from edgeddl.loop import RunResult, run

__all__ = ["ConfigError", "RunResult", "Scenario", "load_scenario", "run"]
__version__ = "0.1.0"
