"""Built-in checks. Importing this package registers them."""

from . import accuracy, adversarial, attribution, backdoor, calibration, certified, corruptions, label_errors, model_sanity, shortcuts, slices  # noqa: F401 - registration side effect
from .base import AuditContext, Check, CheckOptions, CheckState, Needs, REGISTRY, get_check

__all__ = ["REGISTRY", "AuditContext", "Check", "CheckOptions", "CheckState", "Needs", "available_checks", "get_check"]


def available_checks() -> list[str]:
    """Registered check ids in run order."""
    return sorted(REGISTRY, key=lambda cid: (REGISTRY[cid].order, cid))
