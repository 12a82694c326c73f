"""Built-in checks. Importing this package registers them."""

from . import accuracy, adversarial, attribution, backdoor, calibration, certified, corruptions, label_errors, memorization, model_diff, model_sanity, shortcuts, slices  # noqa: F401 - registration side effect
from .base import AuditContext, Check, CheckOptions, CheckState, Needs, REGISTRY

__all__ = ["REGISTRY", "AuditContext", "Check", "CheckOptions", "CheckState", "Needs", "available_checks", "get_check"]


def available_checks() -> list[str]:
    """Registered check ids in run order."""
    return sorted(REGISTRY, key=lambda cid: (REGISTRY[cid].order, cid))


def get_check(check_id: str) -> type[Check]:
    """The registered check class with this id (KeyError naming the id when there is none)."""
    return REGISTRY[check_id]
