"""brittle: find out how and why a trained model fails before its users do.

    import brittle
    result = brittle.audit(model, (x, y), config={"adversarial": {"eps": 0.1}}, out="audit-out")
    result["adversarial"].metrics["robust_accuracy"]
"""

from ._version import SCHEMA_VERSION, __version__
from .config import AuditConfig, load_config
from .errors import BrittleError, InputError, UsageError
from .loading import Dataset, ModelSpec, load_data, load_model
from .model import ModelAdapter
from .result import AuditResult, CheckResult, Finding
from .runner import audit
from .calibrate import calibrate
from .drift import monitor
from .label_free import estimate as estimate_accuracy
from .attribution import attribute
from .training import TrainConfig, train
from .compare import compare as compare_audits
from .model_diff import diff as diff_models
from .unlearning import unlearn_check

__all__ = [
    "AuditConfig", "AuditResult", "BrittleError", "CheckResult", "compare_audits", "Dataset", "diff_models", "Finding", "InputError", "ModelAdapter",
    "ModelSpec", "SCHEMA_VERSION", "TrainConfig", "UsageError", "__version__", "attribute", "audit", "calibrate",
    "estimate_accuracy", "load_config", "load_data", "load_model", "monitor", "train", "unlearn_check",
]
