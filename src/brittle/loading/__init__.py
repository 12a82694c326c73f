"""Loading models and data from files, validated at the boundary."""

from .data import Dataset, load_data
from .models import ModelSpec, load_model

__all__ = ["Dataset", "load_data", "ModelSpec", "load_model"]
