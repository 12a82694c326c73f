import pytest

from brittle import AuditConfig, UsageError, load_config
from brittle.gates import parse_gate
from brittle.plan import resolve


def _write(tmp_path, text):
    p = tmp_path / "audit.toml"
    p.write_text(text)
    return p


def test_valid_config_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, """
seed = 3
gates = ["adversarial.robust_accuracy >= 0.5"]
[model]
bounds = [0, 1]
mean = [0.5]
std = [0.25]
[adversarial]
norm = "linf"
eps = 0.1
steps = 10
"""))
    plan = resolve(cfg)
    assert cfg.seed == 3 and plan.options["adversarial"].norm == "Linf"
    assert plan.gates[0].threshold == 0.5


@pytest.mark.parametrize("text, match", [
    ("[adversarial]\neps = 8\n", r"(?i)did you mean 8/255 = 0.03137"),
    ("[adversarial]\nstepz = 10\n", r"unknown key \[adversarial\] 'stepz' \(did you mean 'steps'\?\)"),
    ("[adverserial]\neps = 0.1\n", r"Unknown config table \[adverserial\] \(did you mean 'adversarial'\?\)"),
    ("[adversarial]\neps = -0.1\n", r"eps: Input should be greater than 0 \(got -0.1\)"),
    ("[adversarial]\nnorm = 'L7'\n", r"norm"),
    ("gates = ['adversarial.robust_acc >= 0.5']\n", r"does not report; its metrics"),
    ("gates = ['robust accuracy above half']\n", r"not of the form"),
    ("checks = ['acuracy']\n", r"Unknown check 'acuracy' \(did you mean 'accuracy'\?\)"),
    ("[model]\nbounds = [1, 0]\n", r"low < high"),
    ("seed = \n", r"not valid TOML"),
])
def test_bad_configs_are_rejected_with_a_hint(tmp_path, text, match):
    with pytest.raises(UsageError, match=match):
        resolve(load_config(_write(tmp_path, text)))


def test_gate_on_unknown_check():
    with pytest.raises(UsageError, match="unknown check 'nope'"):
        parse_gate("nope.x >= 1")


def test_config_from_dict_matches_toml():
    plan = resolve(AuditConfig.from_dict({"adversarial": {"eps": 0.2}, "checks": ["adversarial"]}))
    assert plan.options["adversarial"].eps == 0.2 and plan.checks == ["adversarial"]
