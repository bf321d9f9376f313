"""``hf-svd demo``: every method of the suite on packaged real weights and real text, offline.

One module per step (``eva``, ``dp``, ``fedsvd``, ``fwsvd``, ``merge``), each exposing ``TITLE`` and
``run(ctx) -> StepResult``; :mod:`hf_svd_plugins.demo.runner` runs the selected steps, isolates failures and writes
``report.md``; :mod:`hf_svd_plugins.demo.cli` is the ``hf-svd demo`` verb. torch is imported only inside the steps.
"""

STEP_MODULES = {
    "eva": "hf_svd_plugins.demo.eva",
    "dp": "hf_svd_plugins.demo.dp",
    "fedsvd": "hf_svd_plugins.demo.fedsvd",
    "fwsvd": "hf_svd_plugins.demo.fwsvd",
    "merge": "hf_svd_plugins.demo.merge",
}
