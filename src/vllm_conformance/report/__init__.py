"""Run reports, after pytest-benchmark's habit: measuring, storage, the model and its views
never mix, each in its own module.

- :mod:`.records`: the records on disk (``records/<worker>.jsonl``, appended and synced as
  results are produced, so a killed run keeps everything measured);
- :mod:`.environment`: what a result depends on (versions, GPUs, CPU, variables);
- :mod:`.model`: the records folded into one report (``report.json``'s dict);
- :mod:`.tables`, :mod:`.markdown`, :mod:`.html`: views over the model;
- :mod:`.write`: ``report.json``, ``summary.md`` and ``summary.html`` at the end of a run, or
  later from the records of an interrupted one (``vllm-conformance report RUN_DIR``);
- :mod:`.compare`: the diff of two runs (its own model, analysis and views).
"""

from vllm_conformance.report.environment import cpu_model, environment
from vllm_conformance.report.markdown import summary_markdown
from vllm_conformance.report.model import (
    SCHEMA_VERSION,
    build_report,
    load_report,
    serve_args,
    verdict_class,
)
from vllm_conformance.report.records import RecordSet, RecordWriter, load_records, read_records
from vllm_conformance.report.write import finalize

__all__ = [
    "SCHEMA_VERSION",
    "RecordSet",
    "RecordWriter",
    "build_report",
    "cpu_model",
    "environment",
    "finalize",
    "load_records",
    "load_report",
    "read_records",
    "serve_args",
    "summary_markdown",
    "verdict_class",
]
