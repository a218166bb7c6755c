"""linearize: turn a pretrained softmax-attention LLM into a linear-cost-inference model."""

from linearize.api import export, linearize, load, save_student
from linearize.config import RunConfig, load_config
from linearize.errors import LinearizeError

__version__ = "0.1.0"


def run(config: RunConfig, fresh: bool = False) -> dict:
    """Run the whole recipe (convert, train, evaluate, save, report); see `linearize.pipeline.run`."""
    from linearize.pipeline import run as run_pipeline

    return run_pipeline(config, fresh=fresh)


__all__ = ["LinearizeError", "RunConfig", "export", "linearize", "load", "load_config", "run", "save_student"]
