"""Entry-point glue shared by `train.py` and `validate.py`: logging, and user errors without a traceback."""
import logging
import sys
from typing import Any, Callable

from timm.utils import setup_default_logging

from .args import UserError

__all__ = ['run_cli']


def _user_message(e: BaseException) -> str:
    msg = str(e)
    if 'Original Traceback' in msg:  # re-raised from a DataLoader worker: keep the worker's own message
        msg = msg.strip().splitlines()[-1].split(': ', 1)[-1]
    return msg


def run_cli(fn: Callable[[], Any]) -> Any:
    """Run `fn` with timm's default logging; a `UserError` prints `error: ...` and exits with status 2."""
    if not logging.getLogger().handlers:  # once per process (tests call the mains repeatedly)
        setup_default_logging()
    try:
        return fn()
    except UserError as e:
        print(f'error: {_user_message(e)}', file=sys.stderr, flush=True)
        sys.exit(2)
