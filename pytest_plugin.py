"""pytest plugin: `pytest --edgesd-model DIR` runs `edgesd check`'s checks as test cases.

Registered through the `pytest11` entry point, so it is active wherever edgesd is installed;
without --edgesd-model it only adds its options and imports nothing else (no numpy, no
onnxruntime). One test item per check, named by the check's id, e.g.
`edgesd-check::golden.outputs[unet]`; failed checks fail, checks that do not apply to the
folder are skipped.

    pytest --edgesd-model tiny-onnx                              # in a folder with no other tests
    pytest --edgesd-model tiny-onnx --edgesd-against tiny.safetensors --edgesd-provider cuda --junitxml=r.xml
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("edgesd", "edgesd exported-model conformance checks")
    group.addoption("--edgesd-model", metavar="DIR", help="exported model folder: run `edgesd check` as tests")
    group.addoption("--edgesd-against", metavar="SOURCE", help="also compare with this source checkpoint in torch")
    group.addoption("--edgesd-config", metavar="C", help="config folder or LDM .yaml for --edgesd-against")
    group.addoption("--edgesd-adapter-dir", action="append", metavar="DIR",
                    help="where the adapters the manifest records are (default: beside the source)")
    group.addoption("--edgesd-provider", default="auto", help="auto, cpu, cuda or tensorrt (default auto)")
    group.addoption("--edgesd-only", metavar="GROUPS", help="comma-separated check groups to run")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, so those apply to the checks too
def pytest_collection_modifyitems(session, config, items):
    model = config.getoption("edgesd_model")
    if not model:
        return
    from edgesd.errors import EdgesdError
    from edgesd.runtime.conformance import Context, plan_checks

    only = config.getoption("edgesd_only")
    try:
        ctx = Context(model, provider=config.getoption("edgesd_provider"), against=config.getoption("edgesd_against"),
                      config=config.getoption("edgesd_config"), adapter_dirs=config.getoption("edgesd_adapter_dir") or ())
        plan = plan_checks(ctx, [g.strip() for g in only.split(",") if g.strip()] if only else None)
    except EdgesdError as e:
        raise pytest.UsageError(f"--edgesd-model: {e}") from None
    collector = ModelChecks.from_parent(session, name="edgesd-check", nodeid="edgesd-check")
    checks = [CheckItem.from_parent(collector, name=check.id, check=check, ctx=ctx) for check in plan]
    # report them as collected (as pytest's own collection does), so counts and --co include them
    config.hook.pytest_collectreport(report=pytest.CollectReport(collector.nodeid, "passed", None, checks))
    items.extend(checks)


class ModelChecks(pytest.Collector):
    def collect(self):  # items are made by the hook above
        return []


class CheckFailure(Exception):
    def __init__(self, result):
        super().__init__(result.message)
        self.result = result


class CheckItem(pytest.Item):
    def __init__(self, *, check, ctx, **kwargs):
        super().__init__(**kwargs)
        self.check, self.ctx = check, ctx
        self.add_marker(pytest.mark.edgesd_check)

    def runtest(self):
        result = self.check.run(self.ctx)
        self.user_properties.append(("message", result.message))
        if result.status == "skipped":
            pytest.skip(result.message)
        if result.status in ("failed", "error"):
            raise CheckFailure(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailure):
            import json

            r = excinfo.value.result
            details = json.dumps(r.details, indent=2) if r.details else ""
            return f"{r.id} {r.status}: {r.message}" + (f"\n{details}" if details else "")
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.ctx.path, None, f"edgesd check {self.check.id}: {self.check.description}"


def pytest_configure(config):
    config.addinivalue_line("markers", "edgesd_check: a conformance check of the --edgesd-model folder")
