"""Certified robustness by bound propagation over a model's graph: IBP, CROWN and alpha-CROWN.

For each point, the specification is the margins z_y - z_j (j != y) over the input set: the Linf or L2 ball of
radius eps around x, clipped to the input bounds. A point is certified when a sound lower bound on every margin
is > 0.
- IBP: interval arithmetic node by node, the specification folded into the trailing affine layers
  (`interval.py`).
- CROWN and alpha-CROWN: linear bounds propagated backwards through the graph (`linear.py`).
The graph is read by `network.py`, which refuses by name every operation or layer option it does not model.
"""

from .interval import ibp_margins, input_box, interval_pass, specification
from .linear import Problem, alpha_crown_margins, crown_margins
from .network import NONLINEAR, SUPPORTED, Network, Node, network_from, network_from_module

__all__ = ["NONLINEAR", "Network", "Node", "Problem", "SUPPORTED", "alpha_crown_margins", "crown_margins",
           "ibp_margins", "input_box", "interval_pass", "network_from", "network_from_module", "specification"]
