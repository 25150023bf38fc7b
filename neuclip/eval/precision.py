"""Eval precision: which encoder passes run under torch.autocast. Light on purpose (no torch import): the CLI
and the workflow read PRECISIONS and DEFAULT from here.

    datacomp  DataComp's own choices (the default; mlfoundations/datacomp at 4a8df19, clip-benchmark 1.4.0):
              classification and the WILDS / fairness sets (eval_utils/wds_eval.py) build the zero-shot
              classifier with clip_benchmark's default amp=True but run the images with amp=False;
              retrieval (retr_eval.py, zsr.evaluate's default amp=True) and WinoGAViL (wino_eval.py,
              `torch.cuda.amp.autocast()`) run both encoders under autocast. DataComp's autocast is
              `torch.cuda.amp.autocast` (fp16), which does nothing on a CPU, so on CPU every pass is fp32.
    fp32      no autocast anywhere.
    amp       every pass under torch.autocast on the device (fp16 on CUDA, bf16 on CPU).
"""

from __future__ import annotations

PRECISIONS = ("datacomp", "fp32", "amp")
DEFAULT = "datacomp"


def autocast_plan(precision: str, device_type: str, kind: str) -> dict[str, bool]:
    """{"text": bool, "image": bool}: whether a task of `kind` encodes its texts / images under autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"eval precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return {"text": False, "image": False}
    if precision == "amp":
        return {"text": True, "image": True}
    cuda = device_type == "cuda"
    return {"text": cuda, "image": cuda and kind in ("retrieval", "winogavil")}
