"""mmpipe: the library behind the multimodal pipeline's DVC stages.

Nothing in this package knows about DVC; the scripts under ``stages/`` wire it to the DAG.
"""

__version__ = "0.1.0"
