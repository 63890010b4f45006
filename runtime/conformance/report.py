"""A conformance run's results as a readable table, JSON and JUnit XML."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from edgesd.errors import InvalidArgumentError

MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP", "error": "ERROR"}


@dataclass
class Report:
    model: str
    provider: str
    results: list = field(default_factory=list)
    against: str | None = None

    @property
    def passed(self) -> bool:
        """True when no check failed or errored (skipped checks do not apply to this folder)."""
        return all(r.ok for r in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def counts(self) -> dict:
        counts = {s: 0 for s in MARK}
        for r in self.results:
            counts[r.status] += 1
        return counts

    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    def as_dict(self) -> dict:
        return {"model": self.model, "provider": self.provider, "against": self.against, "passed": self.passed,
                "summary": self.counts(), "checks": [r.as_dict() for r in self.results]}

    def table(self, width: int | None = None) -> str:
        width = width or max(80, shutil.get_terminal_size((120, 20)).columns)
        ids = max([len(r.id) for r in self.results] + [5])
        lines = [self.header(), ""] + [format_line(r, ids, width) for r in self.results]
        return "\n".join(lines + ["", self.summary()])

    def header(self) -> str:
        against = f", against {self.against}" if self.against else ""
        return f"edgesd check {self.model} (provider {self.provider}{against})"

    def summary(self) -> str:
        c = self.counts()
        verdict = "PASSED" if self.passed else "FAILED"
        return f"{verdict}: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"

    def write_json(self, path) -> Path:
        return _write(path, json.dumps(self.as_dict(), indent=2) + "\n")

    def junit(self) -> str:
        c = self.counts()
        total = sum(r.seconds for r in self.results)
        suites = ET.Element("testsuites", name="edgesd check", tests=str(len(self.results)),
                            failures=str(c["failed"]), errors=str(c["error"]), skipped=str(c["skipped"]),
                            time=f"{total:.3f}")
        suite = ET.SubElement(suites, "testsuite", name=f"edgesd check {self.model}", tests=str(len(self.results)),
                              failures=str(c["failed"]), errors=str(c["error"]), skipped=str(c["skipped"]),
                              time=f"{total:.3f}")
        props = ET.SubElement(suite, "properties")
        for key, value in (("model", self.model), ("provider", self.provider), ("against", self.against or "")):
            ET.SubElement(props, "property", name=key, value=value)
        for r in self.results:
            case = ET.SubElement(suite, "testcase", classname=f"edgesd.check.{r.group}",
                                 name=r.id[len(r.group) + 1:], time=f"{r.seconds:.3f}")
            body = json.dumps(r.details, indent=2) if r.details else ""
            if r.status == "failed":
                ET.SubElement(case, "failure", message=r.message, type="CheckFailed").text = body
            elif r.status == "error":
                ET.SubElement(case, "error", message=r.message, type="CheckError").text = body
            elif r.status == "skipped":
                ET.SubElement(case, "skipped", message=r.message)
            else:
                ET.SubElement(case, "system-out").text = r.message
        ET.indent(suites)
        return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"

    def write_junit(self, path) -> Path:
        return _write(path, self.junit())


def format_line(result, id_width: int = 40, width: int | None = None) -> str:
    """One table row: status, check id, message (cut to the terminal width)."""
    width = width or max(80, shutil.get_terminal_size((120, 20)).columns)
    text = f"{MARK[result.status]:5s}  {result.id:{id_width}s}  {result.message}"
    return text if len(text) <= width else text[: width - 3] + "..."


def check_writable(path) -> None:
    """Refuse an output file in a missing folder before any check runs."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise InvalidArgumentError(f"{Path(path).parent}: output folder does not exist")


def _write(path, text: str) -> Path:
    """Reports are complete or absent (runtime/atomic.py)."""
    from edgesd.runtime.atomic import write_atomic

    return write_atomic(path, text.encode("utf-8"), "report")
