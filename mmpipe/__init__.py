"""mmpipe: the library behind the multimodal pipeline's DVC stages.

The scripts under ``stages/`` wire it to the DAG; the library runs without DVC. What it knows of DVC is
what DVC leaves behind, read in the tracking package and nowhere else: the ``DVC_STAGE`` /
``DVC_EXP_NAME`` variables (MLflow tags), DVC's temporary experiment workspaces (``.dvc/tmp/exps/``:
stepping out of them to the main store; ``deploy.registry`` asks ``tracking.in_experiment_workspace``
before moving an alias) and ``dvc.lock``'s hashes (``tracking.lineage``). Two more places speak DVC's
language without reading it: ``layout`` mirrors the paths dvc.yaml declares (a test ties them) and
``tune.dvc_exp_command`` writes the ``dvc exp run`` line that replays a study's winner.
"""

__version__ = "0.1.0"
