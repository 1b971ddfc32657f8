"""Distillation across architectures on the alignment layer's taps: KD, FitNets-style hints, OFA-KD and
TransKD (see methods.py); the teacher's input is reconciled to the student's (distiller.py).

    config.py      DistillConfig (the losses), DistillRun (the whole command), METHODS, register_method
    pipeline.py    run(teacher, data, DistillRun) -> (Checkpoint, Result): student, baselines, CKA, report
    distiller.py   Distiller: the student + a method's helpers, the frozen teacher beside it
    methods.py     scratch, kd, fitnet, ofa, transkd
    projectors.py  OFA exit branches, FitNets regressors
    transkd.py     TransKD's CSF, HCL, PEA, GL-Mixer, embedding assistant
    hybrid.py      Hybrid Distill (hybrid) and its features-only baseline (fd): MIM teacher, token masking
    collab.py      CNN-ViT collaborative learning (collab) and mutual learning (dml): two peers, no teacher
    losses.py      OFA's loss, hint loss
    cka.py         linear CKA between stages

Example:
    >>> import distill
    >>> ckpt, result = distill.run("resnet.pt", "digits", distill.DistillRun(student="vit", method="ofa"))
"""

from compress.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "run": "pipeline", "DistillRun": "config", "DistillConfig": "config", "METHODS": "config",
    "register_method": "config", "Method": "methods", "Distiller": "distiller", "TeacherInput": "distiller",
    "ofa_loss": "losses", "hint_loss": "losses", "kd_loss": "losses", "linear_cka": "cka", "cka_matrix": "cka",
})
