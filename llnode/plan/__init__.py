"""The assignment planner: device/link profiling, one shared cost model, MILP + exact DP + brute force.

Entry point: :func:`solve` (``from llnode.plan import solve, PlanOptions, DeviceProfile, LinkProfile``).
"""

from llnode.plan.solve import solve
from llnode.plan.types import DeviceProfile, LinkProfile, Plan, PlanError, PlanInfeasible, PlanOptions, Stage

__all__ = [
    "DeviceProfile",
    "LinkProfile",
    "Plan",
    "PlanError",
    "PlanInfeasible",
    "PlanOptions",
    "Stage",
    "solve",
]
