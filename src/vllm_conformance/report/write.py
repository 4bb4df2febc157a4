"""Writing a run's report files from its records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_conformance.report import html as htmlview
from vllm_conformance.report.markdown import summary_markdown
from vllm_conformance.report.model import load_report


def finalize(run_dir: Path, *, complete: bool | None = True, html: bool = True) -> dict[str, Any]:
    """Write ``report.json``, ``summary.md`` and ``summary.html`` from the run's records.

    The plugin calls this at the end of the session (``complete=True``); rebuilding a
    killed run's report later passes ``complete=None`` so that it stays marked incomplete.
    """
    run_dir = Path(run_dir)
    report = load_report(run_dir, complete=complete)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "summary.md").write_text(summary_markdown(report))
    if html:
        (run_dir / "summary.html").write_text(htmlview.render_report(report))
    return report
