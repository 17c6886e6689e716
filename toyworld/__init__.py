"""The synthetic long-tail world: ``world``, ``build``, ``judge``, ``diagnose``, ``ship``, ``cli``."""

from pathlib import Path

#: Where the shipped weights live (inside the package, so an installed copy finds them): base/, sr/, judge/.
WEIGHTS = Path(__file__).parent / "weights"
