"""Training stages: attention transfer (stage 1) and LoRA finetuning (stage 2), on one resumable loop."""

from linearize.train.finetune import finetune
from linearize.train.loop import TrainResult, run_steps
from linearize.train.transfer import attention_transfer

__all__ = ["TrainResult", "attention_transfer", "finetune", "run_steps"]
