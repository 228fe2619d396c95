"""VTAB-1k: the 19 tasks' protocol (selection on val200, seeds on train800val200, one test
evaluation each), a resumable runner and its report. `python -m adaptformer_jax.vtab`."""
