"""Conformance checks of an exported model folder (`edgesd check`, `pytest --edgesd-model`).

    from edgesd.runtime.conformance import run_checks
    report = run_checks("tiny-onnx", provider="cpu")        # against="tiny.safetensors" for torch parity
    print(report.table()); report.write_junit("check.xml"); report.exit_code

Torch-free except the `against` group, which needs the export extra.
"""

from edgesd.runtime.conformance.checks import GROUPS, Check, CheckResult, Context, plan_checks
from edgesd.runtime.conformance.report import Report

__all__ = ["GROUPS", "Check", "CheckResult", "Context", "Report", "plan_checks", "run_checks"]


def run_checks(model, *, provider: str = "auto", against=None, config=None, adapter_dirs=(), only=None,
               on_result=None) -> Report:
    """Plan and run every check for the folder `model`; `on_result(result)` is called as each ends.

    Raises EdgesdError only for user mistakes (missing folder, unknown provider or group,
    missing --against source or export extra); a broken folder gives failed checks instead.
    """
    ctx = Context(model, provider=provider, against=against, config=config, adapter_dirs=adapter_dirs)
    report = Report(str(model), ctx.provider_name, against=str(against) if against else None)
    for check in plan_checks(ctx, only):
        result = check.run(ctx)
        report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report
