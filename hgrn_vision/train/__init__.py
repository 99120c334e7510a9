"""Training and evaluation of HGRN-DeiT with timm's machinery: the logic behind `train.py` and `validate.py`."""
from .args import UserError, parse_args, train_parser, validate_parser
from .checkpoint import AtomicCheckpointSaver, load_finetune_checkpoint, resume_training_state
from .data import build_dataset, prepare_fashion_mnist
from .evaluate import validate, write_results
from .trainer import train
