"""timm model entries; importing this registers them."""
from .hgrn_deit import *
