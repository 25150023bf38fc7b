"""DataComp's extra metrics (WILDS / fairness groups, WinoGAViL Jaccard) on hand-checked examples, the task
registry against DataComp's tasklist, and the eval precision plan against DataComp's evaluation code."""

from __future__ import annotations

import numpy as np
import pytest

from neuclip.eval import metrics as m
from neuclip.eval.precision import DEFAULT, PRECISIONS, autocast_plan
from neuclip.eval.suites import DATACOMP_TASKS, GROUPS, SUITES, TASKS


def one_hot_logits(pred, classes):
    logits = np.zeros((len(pred), classes))
    logits[np.arange(len(pred)), pred] = 1.0
    return logits


def test_worst_group_accuracy_geode_and_fmow():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    pred = np.array([0, 1, 2, 1, 1, 0, 0, 2])  # correct: 1 1 1 0 1 0 1 0
    region = np.array([0, 0, 0, 1, 1, 1, 3, 3])  # region 2 empty: skipped, as WILDS does
    year = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    geode = m.wilds_metrics("geode", one_hot_logits(pred, 3), labels, np.stack([region, region], 1))
    assert geode == {"acc_avg": pytest.approx(5 / 8), "acc_wg": pytest.approx(1 / 3)}
    fmow = m.wilds_metrics("fmow", one_hot_logits(pred, 3), labels, np.stack([region, year, labels], 1))
    assert fmow["acc_worst_region"] == pytest.approx(1 / 3)
    assert fmow["acc_region:0"] == 1.0 and fmow["acc_region:3"] == 0.5 and "acc_region:2" not in fmow
    assert fmow["acc_worst_year"] == pytest.approx(1 / 4)  # year 0: 4/4 correct, year 1: 1/4


def test_dollar_street_top5_worst_income_group():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 8))
    order = np.argsort(-logits, axis=1)
    labels = np.array([order[0, 0], order[1, 4], order[2, 5], order[3, 7], order[4, 2], order[5, 6]])
    income = np.array([0, 0, 1, 1, 2, 2])  # hits: 1 1 0 0 1 0
    out = m.wilds_metrics("dollar_street", logits, labels, np.stack([income, income, income], 1))
    assert out == {"acc_top5_avg": pytest.approx(0.5), "acc_top5_wg": 0.0}


def test_iwildcam_macro_f1_over_present_labels_only():
    labels = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 is predicted but absent: not averaged in (WILDS passes labels=unique)
    out = m.wilds_metrics("iwildcam", one_hot_logits(pred, 3), labels, np.zeros((4, 1)))
    f1_0, f1_1 = 2 * 1 * 0.5 / 1.5, 1.0  # class 0: precision 1, recall 1/2; class 1: perfect
    assert out["F1-macro_all"] == pytest.approx((f1_0 + f1_1) / 2)
    assert out["acc_avg"] == 0.75


def test_winogavil_scoring():
    assert m.winogavil_prompt("Apple") == "An apple" and m.winogavil_prompt("dog") == "A dog"
    sims = np.array([0.9, 0.1, 0.8, 0.3, 0.2])
    assert m.winogavil_instance_score(sims, np.array([1, 0, 1, 0, 0], bool)) == 1.0
    assert m.winogavil_instance_score(sims, np.array([1, 1, 0, 0, 0], bool)) == pytest.approx(1 / 3)
    out = m.winogavil_metrics([1.0, 0.5, 0.25, 0.75], [5, 6, 10, 12])
    assert out["jaccard_score_10-12"] == 0.5 and out["jaccard_score_5-6"] == 0.75 and out["avg_jaccard_score"] == 0.625


def test_datacomp_registry_matches_datacomp_tasklist():
    assert len(DATACOMP_TASKS) == 38 and len({t.id for t in DATACOMP_TASKS}) == 38
    main = {t.datacomp_key: t.main_metric for t in DATACOMP_TASKS}
    special = {
        "vtab/caltech101": "mean_per_class_recall",
        "fgvc_aircraft": "mean_per_class_recall",
        "vtab/flowers": "mean_per_class_recall",
        "vtab/pets": "mean_per_class_recall",
        "retrieval/flickr_1k_test_image_text_retrieval": "mean_recall@1",
        "retrieval/mscoco_2014_5k_test_image_text_retrieval": "mean_recall@1",
        "misc/winogavil": "jaccard_score_10-12",
        "wilds/iwildcam": "F1-macro_all",
        "wilds/fmow": "acc_worst_region",
        "fairness/dollar_street": "acc_top5_wg",
        "fairness/geode": "acc_wg",
    }
    assert {k: v for k, v in main.items() if v != "acc1"} == special
    assert "fairness/fairface" not in main and "fairness/utkface" not in main  # no main metric in DataComp
    assert TASKS["dollar_street"].folder == "wds_dollar_street_test"  # download_evalsets drops "fairness/"
    assert TASKS["clevr_count"].folder == "wds_vtab-clevr_count_all_test"
    assert TASKS["iwildcam"].folder == "wds_wilds-iwildcam_test"
    assert set(SUITES) == set(GROUPS) == {"tiny", "datacomp38", "imagenet_variants", "retrieval"}
    assert GROUPS["retrieval"] == ("flickr30k", "mscoco", "winogavil")


def test_flickr_is_datacomps_1k_test_set():
    # tasklist.yml since 50f09feb (May 2023): `retrieval/flickr_1k_test_image_text_retrieval`, size 1000,
    # loaded by retr_eval.py as nlphuji/<key without "retrieval/"> from DATA/hf_cache; the full 31,014-image
    # `retrieval/flickr30k` is gone from every suite (the retrieval suite included).
    flickr = TASKS["flickr30k"]
    assert flickr.datacomp_key == "retrieval/flickr_1k_test_image_text_retrieval"
    assert flickr.dataset == "nlphuji/flickr_1k_test_image_text_retrieval" and flickr.size == 1000
    assert flickr.dataset == "nlphuji/" + flickr.datacomp_key.removeprefix("retrieval/")
    assert (flickr.name, flickr.kind, flickr.main_metric, flickr.folder) == (
        "Flickr",
        "retrieval",
        "mean_recall@1",
        "hf_cache",
    )
    assert not any(t.size == 31014 or t.dataset == "nlphuji/flickr30k" for t in TASKS.values())
    assert "flickr30k" in SUITES["datacomp38"] and "flickr30k" in SUITES["retrieval"]
    assert TASKS["mscoco"].size == 5000 and TASKS["winogavil"].size == 3563


def test_imagenet_variants_are_the_papers_seven_sets():
    # The paper's mean includes IN-1k; DataComp's "ImageNet dist. shifts" (aggregate_scores.py) is the other six.
    names = {TASKS[i].name for i in GROUPS["imagenet_variants"]}
    shifts = {"ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet"}
    assert names == shifts | {"ImageNet 1k"}


def test_datacomp_precision_plan():
    # DataComp (clip-benchmark 1.4.0, whose autocast is torch.cuda.amp.autocast): wds_eval.py builds the
    # classifier at the default amp=True and runs images with amp=False; retr_eval.py and wino_eval.py run
    # under autocast. On CPU torch.cuda.amp.autocast does nothing.
    assert DEFAULT == "datacomp"
    on, off = {"text": True, "image": True}, {"text": False, "image": False}
    assert autocast_plan("datacomp", "cuda", "classification") == {"text": True, "image": False}
    assert autocast_plan("datacomp", "cuda", "wilds") == {"text": True, "image": False}
    assert autocast_plan("datacomp", "cuda", "retrieval") == on == autocast_plan("datacomp", "cuda", "winogavil")
    for kind in ("classification", "wilds", "retrieval", "winogavil"):
        assert autocast_plan("datacomp", "cpu", kind) == off
        for device in ("cpu", "cuda"):
            assert autocast_plan("fp32", device, kind) == off and autocast_plan("amp", device, kind) == on
    with pytest.raises(ValueError, match="choose from datacomp, fp32, amp"):
        autocast_plan("bf16", "cuda", "retrieval")


def test_schema_and_cli_offer_the_precisions():
    import argparse
    from pathlib import Path

    import yaml

    from neuclip.commands import eval as eval_command

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflows" / "schema.yaml").read_text())
    assert schema["properties"]["eval"]["properties"]["precision"]["enum"] == list(PRECISIONS)
    parser = argparse.ArgumentParser()
    eval_command.register(parser.add_subparsers())
    argv = ["eval", "--model-dir", "m", "--suite", "tiny", "--data-root", "d", "--out", "o"]
    assert parser.parse_args(argv).precision == DEFAULT
    assert parser.parse_args(argv + ["--precision", "amp"]).precision == "amp"
