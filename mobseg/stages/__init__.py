"""The pipeline's stages: a Python API that the CLI and the study runner call.

Each module has a ``*Params`` dataclass and a ``run(workspace, params, force=...)``
function that records itself in the manifest. Stage keys are built by
:mod:`mobseg.stages.keys`.
"""
