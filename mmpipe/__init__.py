"""mmpipe: the library behind the multimodal pipeline's DVC stages.

The scripts under ``stages/`` wire it to the DAG; the library runs without DVC. Two places read what
DVC leaves in the environment, and only that: ``tracking`` (the ``DVC_STAGE`` / ``DVC_EXP_NAME``
variables for MLflow tags, and stepping out of ``.dvc/tmp/exps/`` workspaces to the main store) and
``deploy.export.alias_decision`` (no registry alias moved from a temporary experiment workspace).
"""

__version__ = "0.1.0"
