"""Adding an estimator is one file: the registry derives the schema enum, the report labels, the scored set,
the shadow defaults and `neuclip methods` from the class (docs/methods.md, "Adding an estimator")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

THROWAWAY = '''"""A throwaway estimator written by tests/test_registry.py: an OpenCLIP with one more knob."""

from baselines.openclip import OpenCLIP
from neuclip.estimators.options import number


class Throwaway(OpenCLIP):
    name = "{name}"
    label = "Throwaway-{name}"
    description = "test-only estimator"
    colour = "tab:pink"
    shadow = {{}}
    order = 99
    options = {{**OpenCLIP.options, "knob": number(1.0, "a test knob", minimum=0)}}
'''

PROBE = """
import json, neuclip.grid.workflow as wf
from neuclip.estimators import registry
from neuclip.report import loading
from neuclip.error_study import shadow
print(json.dumps({
    "enum": wf.schema()["definitions"]["method"]["enum"],
    "labels": loading.METHOD_ORDER,
    "label": loading.method_label(NAME, {}),
    "scored": registry.scored_methods(),
    "shadows": sorted(shadow.DEFAULT_SHADOWS),
    "colour": registry.colours().get(NAME),
}))
"""


@pytest.mark.slow
def test_a_new_estimator_file_is_found_everywhere(tmp_path):
    """...and its name may hold digits and underscores: the workflow schedules its cell (`snakemake -n`)."""
    name = f"throw_away2_{os.getpid()}"
    path = REPO / "baselines" / f"{name}.py"
    path.write_text(THROWAWAY.format(name=name))
    experiment = tmp_path / "exp.yaml"
    tiny = yaml.safe_load((REPO / "workflows/configs/tiny.yaml").read_text())
    experiment.write_text(yaml.safe_dump({**tiny, "methods": [name], "error_study": None, "drivers": None}))
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    try:
        listing = subprocess.run([sys.executable, "-m", "neuclip.cli", "methods", "--options"], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout
        probe = subprocess.run([sys.executable, "-c", f"NAME = {name!r}\n" + PROBE], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
        dag = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-d",
                              str(tmp_path / "work"), "-n", "all", "--configfile", str(experiment)],
                             capture_output=True, text=True, env=env, timeout=300)
    finally:
        path.unlink()
    assert dag.returncode == 0, dag.stdout[-3000:] + dag.stderr[-3000:]
    assert f"runs/tiny/synthetic/{name}/default/seed0/done.json" in dag.stdout, dag.stdout[-3000:]
    found = json.loads(probe)
    assert f"{name}  test-only estimator" in listing and "knob = 1.0" in listing
    assert name in found["enum"]
    assert f"Throwaway-{name}" in found["labels"] and found["label"] == f"Throwaway-{name}"
    assert name in found["scored"] and name in found["shadows"]
    assert found["colour"] == "tab:pink"


def test_common_option_typos_and_bad_values_name_the_key():
    from neuclip.estimators.options import OptionError
    from neuclip.estimators.registry import resolve_options

    with pytest.raises(OptionError, match=r"common_options: \['rhoo'\] is not a shared option"):
        resolve_options("fastclip", {}, {"rhoo": 6.5})
    with pytest.raises(OptionError, match=r"method.options.inner_steps of method 'neuclip' must be an integer >= 1"):
        resolve_options("neuclip", {"inner_steps": 0}, {})
    with pytest.raises(OptionError, match=r"num_prototypes of method 'neuclip' must be an integer >= 1, got 'abc'"):
        resolve_options("neuclip", {"num_prototypes": "abc"}, {})
    with pytest.raises(OptionError, match=r"common_options.gamma_min of method 'fastclip' must be"):
        resolve_options("fastclip", {}, {"gamma_min": "fast"})
    with pytest.raises(OptionError, match=r"common_options.lr_tau of method 'neuclip' must be a number >= 0"):
        resolve_options("neuclip", {}, {"lr_tau": "fast"})
    # a shared key is applied only where the method takes it: OpenCLIP's logit scale keeps the model lr
    assert resolve_options("openclip", {}, {"lr_tau": 2e-4, "rho": 6.5})["lr_logit_scale"] is None
    assert resolve_options("fastclip", {}, {"lr_tau": 2e-4})["lr_tau"] == 2e-4


def test_prototypes_beyond_the_data_warn_with_the_fill_rule():
    from neuclip.estimators.base import EstimatorContext
    from neuclip.estimators.registry import check_method

    _, warnings = check_method("neuclip", {"num_prototypes": 5000}, {}, EstimatorContext(embed_dim=8, data_size=4096),
                               64)
    assert len(warnings) == 1 and "drawn with replacement plus Gaussian jitter" in warnings[0]
