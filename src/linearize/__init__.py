"""linearize: turn a pretrained softmax-attention LLM into a linear-cost-inference model.

Importing the package registers our model types with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` opens any directory this package writes.
"""

from linearize import models  # noqa: F401  (registers the Auto classes)
from linearize.api import export, linearize, load, load_config, run
from linearize.errors import LinearizeError
from linearize.models import LinearizedConfig, LinearizedForCausalLM

__version__ = "0.2.0"

__all__ = [
    "LinearizeError",
    "LinearizedConfig",
    "LinearizedForCausalLM",
    "export",
    "linearize",
    "load",
    "load_config",
    "run",
]
