"""Evaluation tasks and suites, as data.

A task is one data set with one main metric. A suite is the list of tasks one `neuclip eval --suite` run
evaluates; a group is a list of tasks whose main metrics are averaged into one number in summary.json.

The DataComp list below reproduces DataComp's `tasklist.yml` (github.com/mlfoundations/datacomp at 4a8df19, April
2025, the version that `evaluate.py` and `aggregate_scores.py` read): its 38 tasks that have a main metric
(FairFace and UTKFace have none and do not count), each task's `main_metric` (`acc1` where the file names none, as
`evaluate.py` defaults), and its averaging rule (`aggregate_scores.py`: the plain mean of the 38 main metrics,
every task weighted equally; its "Retrieval" group is Flickr, MSCOCO and WinoGAViL). Data folder names follow
DataComp's `download_evalsets.py`: `wds_<key with / -> ->_test` for webdataset sets (the `fairness/` prefix is
dropped), and the Hugging Face `datasets` cache under `hf_cache/` for the three `nlphuji/...` sets.
Values are fractions in [0, 1], as clip_benchmark and DataComp write them (papers print percentages).
"""

from __future__ import annotations

from dataclasses import dataclass

from neuclip.data.synth import CLASSIFICATION

# How each kind of task is evaluated (see runner.py):
#   classification  clip_benchmark zero-shot classification on a clip_benchmark `wds/` folder
#   wilds           the same, plus WILDS / fairness group metrics from the per-sample `.npy` metadata
#   retrieval       clip_benchmark zero-shot retrieval (recall@1/5/10), on a `wds/` folder or an HF data set
#   winogavil       DataComp's WinoGAViL protocol (Jaccard index of the top-k candidate images)
KINDS = ("classification", "wilds", "retrieval", "winogavil")


@dataclass(frozen=True)
class Task:
    id: str  # key in summary.json and the result file's stem: OUT_DIR/<id>.json
    name: str  # display name (DataComp's, where the task is DataComp's); display only
    kind: str  # one of KINDS
    main_metric: str  # key of the result JSON's "metrics" that summary.json and the groups use
    folder: str  # where the data lives, relative to --data-root
    dataset: str  # clip_benchmark dataset name (`wds/...`) or Hugging Face data set id (`nlphuji/...`)
    datacomp_key: str | None = None  # the task's key in DataComp's tasklist.yml
    size: int | None = None  # number of test examples (DataComp's tasklist); part of the task's fingerprint
    num_classes: int | None = None
    random_score: float | None = None  # chance level of the main metric (DataComp's tasklist); display only
    wilds: str | None = None  # group-metric recipe for kind "wilds": iwildcam | fmow | dollar_street | geode

    @property
    def source(self) -> str:
        """'wds' (clip_benchmark webdataset folder) or 'hf' (Hugging Face `datasets` cache)."""
        return "hf" if self.dataset.startswith("nlphuji/") else "wds"

    @property
    def clip_benchmark_task(self) -> str:
        return {"retrieval": "zeroshot_retrieval", "winogavil": "winogavil"}.get(self.kind, "zeroshot_classification")


def _wds(task_id, name, key, metric="acc1", *, size, classes, chance, kind="classification", wilds=None) -> Task:
    short = key.removeprefix("fairness/")
    return Task(
        id=task_id,
        name=name,
        kind=kind,
        main_metric=metric,
        folder=f"wds_{short.replace('/', '-')}_test",
        dataset=f"wds/{short}",
        datacomp_key=key,
        size=size,
        num_classes=classes,
        random_score=chance,
        wilds=wilds,
    )


def _hf(task_id, name, key, repo, metric, *, size, chance=None, kind="retrieval") -> Task:
    # download_evalsets.py: datasets.load_dataset("nlphuji/<name>", split="test", cache_dir=DATA/hf_cache)
    return Task(task_id, name, kind, metric, "hf_cache", repo, key, size, None, chance)


MPCR = "mean_per_class_recall"

# DataComp's 38 tasks, in tasklist.yml order.
DATACOMP_TASKS: tuple[Task, ...] = (
    _wds("caltech101", "Caltech-101", "vtab/caltech101", MPCR, size=6085, classes=102, chance=0.009804),
    _wds("cifar10", "CIFAR-10", "cifar10", size=10000, classes=10, chance=0.1),
    _wds("cifar100", "CIFAR-100", "vtab/cifar100", size=10000, classes=100, chance=0.01),
    _wds("clevr_count", "CLEVR Counts", "vtab/clevr_count_all", size=15000, classes=8, chance=0.125061),
    _wds(
        "clevr_distance", "CLEVR Distance", "vtab/clevr_closest_object_distance", size=15000, classes=6, chance=0.19052
    ),
    _wds("country211", "Country211", "country211", size=21100, classes=211, chance=0.004739),
    _wds("dtd", "Describable Textures", "vtab/dtd", size=1880, classes=47, chance=0.021277),
    _wds("eurosat", "EuroSAT", "vtab/eurosat", size=5400, classes=10, chance=0.101483),
    _wds("fgvc_aircraft", "FGVC Aircraft", "fgvc_aircraft", MPCR, size=3333, classes=100, chance=0.01),
    _wds("food101", "Food-101", "food101", size=25250, classes=101, chance=0.009901),
    _wds("gtsrb", "GTSRB", "gtsrb", size=12630, classes=43, chance=0.037604),
    _wds("imagenet1k", "ImageNet 1k", "imagenet1k", size=50000, classes=1000, chance=0.001),
    _wds("imagenet_sketch", "ImageNet Sketch", "imagenet_sketch", size=50889, classes=1000, chance=0.001),
    _wds("imagenetv2", "ImageNet v2", "imagenetv2", size=10000, classes=1000, chance=0.001),
    _wds("imagenet-a", "ImageNet-A", "imagenet-a", size=7500, classes=200, chance=0.008056),
    _wds("imagenet-o", "ImageNet-O", "imagenet-o", size=2000, classes=200, chance=0.006047),
    _wds("imagenet-r", "ImageNet-R", "imagenet-r", size=30000, classes=200, chance=0.006163),
    _wds(
        "kitti_distance",
        "KITTI Vehicle Distance",
        "vtab/kitti_closest_vehicle_distance",
        size=711,
        classes=4,
        chance=0.295289,
    ),
    _wds("mnist", "MNIST", "mnist", size=10000, classes=10, chance=0.10035),
    _wds("objectnet", "ObjectNet", "objectnet", size=18574, classes=113, chance=0.009481),
    _wds("flowers", "Oxford Flowers-102", "vtab/flowers", MPCR, size=6149, classes=102, chance=0.009804),
    _wds("pets", "Oxford-IIIT Pet", "vtab/pets", MPCR, size=3669, classes=37, chance=0.027027),
    _wds("voc2007", "Pascal VOC 2007", "voc2007", size=14976, classes=20, chance=0.154038),
    _wds("pcam", "PatchCamelyon", "vtab/pcam", size=32768, classes=2, chance=0.5),
    _wds("renderedsst2", "Rendered SST2", "renderedsst2", size=1821, classes=2, chance=0.500001),
    _wds("resisc45", "RESISC45", "vtab/resisc45", size=6300, classes=45, chance=0.022342),
    _wds("cars", "Stanford Cars", "cars", size=8041, classes=196, chance=0.00516),
    _wds("stl10", "STL-10", "stl10", size=8000, classes=10, chance=0.1),
    _wds("sun397", "SUN397", "sun397", size=108754, classes=397, chance=0.004645),
    _wds("svhn", "SVHN", "vtab/svhn", size=26032, classes=10, chance=0.117897),
    # Retrieval: DataComp loads these with Hugging Face `datasets` (nlphuji/...), recall@{1,5,10}, and scores
    # mean_recall@1 = (image_retrieval_recall@1 + text_retrieval_recall@1) / 2.
    # Flickr = the Flickr30k 1k test set: DataComp's tasklist.yml has had this key (with size 1000) since
    # 50f09feb (15 May 2023, "Update with correct Flickr30k test set"), replacing `retrieval/flickr30k`, the
    # whole 31,014-image nlphuji/flickr30k (train, val and test splits together). The id stays "flickr30k",
    # the benchmark's name, as "mscoco" names the MSCOCO 5k test set.
    _hf(
        "flickr30k",
        "Flickr",
        "retrieval/flickr_1k_test_image_text_retrieval",
        "nlphuji/flickr_1k_test_image_text_retrieval",
        "mean_recall@1",
        size=1000,
    ),
    _hf(
        "mscoco",
        "MSCOCO",
        "retrieval/mscoco_2014_5k_test_image_text_retrieval",
        "nlphuji/mscoco_2014_5k_test_image_text_retrieval",
        "mean_recall@1",
        size=5000,
    ),
    _hf(
        "winogavil",
        "WinoGAViL",
        "misc/winogavil",
        "nlphuji/winogavil",
        "jaccard_score_10-12",
        size=3563,
        chance=0.205,
        kind="winogavil",
    ),
    # WILDS and fairness sets: zero-shot classification plus group metrics from the .npy metadata.
    _wds(
        "iwildcam",
        "iWildCam",
        "wilds/iwildcam",
        "F1-macro_all",
        size=42791,
        classes=182,
        chance=0.143056,
        kind="wilds",
        wilds="iwildcam",
    ),
    _wds("camelyon17", "Camelyon17", "wilds/camelyon17", size=85054, classes=2, chance=0.5),
    _wds(
        "fmow",
        "FMoW",
        "wilds/fmow",
        "acc_worst_region",
        size=22108,
        classes=62,
        chance=0.027193,
        kind="wilds",
        wilds="fmow",
    ),
    _wds(
        "dollar_street",
        "Dollar Street",
        "fairness/dollar_street",
        "acc_top5_wg",
        size=3503,
        classes=58,
        chance=None,
        kind="wilds",
        wilds="dollar_street",
    ),
    _wds(
        "geode",
        "GeoDE",
        "fairness/geode",
        "acc_wg",
        size=12488,
        classes=40,
        chance=None,
        kind="wilds",
        wilds="geode",
    ),
)


def _synth(name: str, kind: str, metric: str, classes: int | None = None) -> Task:
    # neuclip.data.synth writes these under the synthetic data folder (the --data-root of the tiny suite).
    chance = 1.0 / classes if classes else None  # retrieval's chance (1/N test pairs) depends on the set's size
    return Task(f"synth_{name}", f"Synthetic {name}", kind, metric, f"eval/wds_synth_{name}", f"wds/synth_{name}",
                num_classes=classes, random_score=chance)


def _synth_classes() -> dict[str, int]:
    """Class counts of the synthetic zero-shot sets, from the generator's own class lists."""
    return {key.removeprefix("synth_"): len(classes) for key, (_, classes, _) in CLASSIFICATION.items()}


TINY_TASKS: tuple[Task, ...] = (
    *(_synth(name, "classification", "acc1", n) for name, n in _synth_classes().items()),
    _synth("retrieval", "retrieval", "mean_recall@1"),
)

TASKS: dict[str, Task] = {t.id: t for t in DATACOMP_TASKS + TINY_TASKS}

# The paper's "ImageNet & variants": the mean top-1 of 7 sets, IN-1k included (DataComp's aggregate_scores.py
# "ImageNet dist. shifts" is the other 6 without IN-1k; it is not computed here). "Retrieval": DataComp's
# grouping (Flickr, MSCOCO, WinoGAViL). Its Flickr is the same 1k test set as DataComp-38's: the paper's
# "Flickr30k" recall@1 comes from DataComp's evaluation (the FastCLIP code points there for DataComp numbers,
# and the papers postdate May 2023), and the 1k test split is what "Flickr30k retrieval" means in CLIP papers;
# the full 31,014 images would score retrieval over the training split too.
IMAGENET_VARIANTS = (
    "imagenet1k",
    "imagenetv2",
    "imagenet_sketch",
    "imagenet-a",
    "imagenet-o",
    "imagenet-r",
    "objectnet",
)
RETRIEVAL = ("flickr30k", "mscoco", "winogavil")

# Groups written to summary.json["groups"]: the plain mean of the tasks' main metrics, or null unless every
# task of the group is in the run's suite.
GROUPS: dict[str, tuple[str, ...]] = {
    "datacomp38": tuple(t.id for t in DATACOMP_TASKS),
    "imagenet_variants": IMAGENET_VARIANTS,
    "retrieval": RETRIEVAL,
    "tiny": tuple(t.id for t in TINY_TASKS),
}

SUITES: dict[str, tuple[str, ...]] = {
    "tiny": GROUPS["tiny"],
    "datacomp38": GROUPS["datacomp38"],
    "imagenet_variants": IMAGENET_VARIANTS,
    "retrieval": RETRIEVAL,
}

assert len(DATACOMP_TASKS) == 38 and len(TASKS) == 42
assert all(t.kind in KINDS for t in TASKS.values())
assert all(i in TASKS for ids in GROUPS.values() for i in ids)
assert all(TASKS[i].main_metric == "acc1" for i in IMAGENET_VARIANTS)


def suite_tasks(suite: str) -> list[Task]:
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    return [TASKS[i] for i in SUITES[suite]]
