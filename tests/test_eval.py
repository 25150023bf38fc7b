"""`neuclip eval`: results equal an independent computation, missing data fails first, runs resume, a cached
result is reused only for the same task definition, and each encoder pass runs at its planned precision.

The independent computation reads the tar shards with `tarfile` and PIL (not webdataset or clip_benchmark),
encodes images and prompts itself and computes top-1 / top-5 / per-class recall and recall@k from the raw
embeddings.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from neuclip.eval import runner, suites
from neuclip.eval.runner import ForeignResultsError, MissingDataError, evaluate_suite
from neuclip.eval.suites import DATACOMP_TASKS, GROUPS, IMAGENET_VARIANTS, RETRIEVAL, TASKS

torch.set_num_threads(1)

EVAL = dict(batch_size=8, workers=0, device="cpu", progress=False)  # default precision: DataComp's (fp32 on CPU)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from neuclip.export import create_model, save_model

    torch.manual_seed(0)
    model = create_model("tiny-vit")[0]
    return save_model(model, "tiny-vit", tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def tiny_run(model_dir, synth_data, tmp_path_factory):
    """A finished tiny-suite evaluation (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("eval") / "tiny"
    summary = evaluate_suite(model_dir, "tiny", synth_data, out, **EVAL)
    return out, summary


def _forbid_model_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded: work started")

    monkeypatch.setattr("neuclip.export.load_model", fail)


# ------------------------------------------------------------------------------ independent reference


def read_wds(folder):
    samples = {}
    for tar in sorted((folder / "test").glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


def encode_images(model, transform, samples):
    images = torch.stack([transform(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples])
    with torch.no_grad():
        return F.normalize(model.encode_image(images), dim=-1)


def encode_texts(model, tokenizer, texts):
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(texts)), dim=-1)


def reference_classification(model, transform, tokenizer, folder):
    samples = read_wds(folder)
    classes = (folder / "classnames.txt").read_text().splitlines()
    templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
    labels = np.array([int(s["cls"]) for s in samples])
    weights = []
    for c in classes:
        mean = encode_texts(model, tokenizer, [t.format(c=c) for t in templates]).mean(0)
        weights.append(mean / mean.norm())
    logits = (encode_images(model, transform, samples) @ torch.stack(weights).T).numpy()
    order = np.argsort(-logits, axis=1)
    top1 = order[:, 0] == labels
    recall = [top1[labels == c].mean() for c in np.unique(labels)]
    out = {"acc1": top1.mean(), "mean_per_class_recall": float(np.mean(recall))}
    if len(classes) >= 5:
        out["acc5"] = (order[:, :5] == labels[:, None]).any(1).mean()
    return out


def reference_retrieval(model, transform, tokenizer, folder, ks=(1, 5, 10)):
    samples = read_wds(folder)
    captions = [s["txt"].decode().splitlines() for s in samples]
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps])
    texts = encode_texts(model, tokenizer, [c for caps in captions for c in caps])
    scores = (texts @ encode_images(model, transform, samples).T).numpy()  # (texts, images)
    out = {}
    for k in ks:
        text_to_image = np.argsort(-scores, axis=1)[:, :k]
        out[f"image_retrieval_recall@{k}"] = (text_to_image == owner[:, None]).any(1).mean()
        image_to_text = np.argsort(-scores.T, axis=1)[:, :k]
        out[f"text_retrieval_recall@{k}"] = (owner[image_to_text] == np.arange(len(samples))[:, None]).any(1).mean()
    out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    return out


# ------------------------------------------------------------------------------ tiny suite


def test_tiny_suite_equals_independent_computation(tiny_run, model_dir, synth_data):
    from neuclip.export import load_model

    out, summary = tiny_run
    model, transform, tokenizer = load_model(model_dir)
    for task in ("synth_shape", "synth_colour", "synth_position", "synth_retrieval"):
        result = json.loads((out / f"{task}.json").read_text())
        assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(result)
        assert result["dataset"] == f"wds/{task}"
        folder = synth_data / TASKS[task].folder
        if task == "synth_retrieval":
            assert result["task"] == "zeroshot_retrieval"
            expected = reference_retrieval(model, transform, tokenizer, folder)
        else:
            assert result["task"] == "zeroshot_classification"
            expected = reference_classification(model, transform, tokenizer, folder)
        for name, value in expected.items():
            assert result["metrics"][name] == pytest.approx(value, abs=1e-6), (task, name)
        entry = summary["tasks"][task]
        assert entry == {
            "metric": TASKS[task].main_metric,
            "value": result["metrics"][TASKS[task].main_metric],
            "json": f"{task}.json",
            "name": TASKS[task].name,
        }


def test_tiny_summary_format(tiny_run, model_dir):
    out, summary = tiny_run
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary) == {"suite", "model_dir", "tasks", "groups"}
    assert summary["suite"] == "tiny" and summary["model_dir"] == str(model_dir.resolve())
    assert list(summary["groups"]) == ["datacomp38", "imagenet_variants", "retrieval", "tiny"]
    values = [summary["tasks"][t]["value"] for t in GROUPS["tiny"]]
    assert summary["groups"]["tiny"] == pytest.approx(np.mean(values))
    assert summary["groups"]["datacomp38"] is None and summary["groups"]["retrieval"] is None
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_cli_runs_tiny_suite(model_dir, synth_data, tmp_path, capsys):
    from neuclip.cli import main

    argv = ["eval", "--model-dir", str(model_dir), "--suite", "tiny", "--data-root", str(synth_data)]
    argv += ["--out", str(tmp_path / "out"), "--batch-size", "5", "--workers", "1", "--device", "cpu"]
    argv += ["--precision", "fp32"]
    assert main(argv + ["--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["tasks"]) == set(GROUPS["tiny"])
    assert "synth_shape" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "synth_shape.json").read_text())["neuclip"]
    assert record["precision"] == "fp32" and record["amp"] == {"text": False, "image": False}


# ------------------------------------------------------------------------------ missing data


def test_missing_data_fails_before_any_work(model_dir, synth_data, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    shutil.rmtree(data / "eval" / "wds_synth_colour")
    (data / "eval" / "wds_synth_position" / "test" / "0.tar").unlink()
    _forbid_model_loading(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(MissingDataError) as err:
        evaluate_suite(model_dir, "tiny", data, out, **EVAL)
    message = str(err.value)
    assert [m.task.id for m in err.value.missing] == ["synth_colour", "synth_position"]
    assert "2 of 4 data sets missing" in message and "nothing was evaluated" in message
    assert str(data / "eval" / "wds_synth_colour") in message
    assert str(data / "eval" / "wds_synth_position" / "test" / "0.tar") in message
    assert f"neuclip data synth {data}" in message
    assert "synth_shape" not in message and "synth_retrieval" not in message
    assert not out.exists()

    from neuclip.cli import main

    argv = ["eval", "--model-dir", str(model_dir), "--suite", "tiny", "--data-root", str(data), "--out", str(out)]
    assert main(argv) == 2
    assert "wds_synth_colour" in capsys.readouterr().err
    assert not out.exists()


def test_missing_datacomp_data_names_every_set_and_its_download(model_dir, tmp_path, monkeypatch):
    _forbid_model_loading(monkeypatch)
    monkeypatch.setattr("neuclip.eval.data.datasets_installed", lambda: True)
    with pytest.raises(MissingDataError) as err:
        evaluate_suite(model_dir, "datacomp38", tmp_path / "none", tmp_path / "out", **EVAL)
    message = str(err.value)
    assert len(err.value.missing) == 38 and "38 of 38 data sets missing" in message
    for task in DATACOMP_TASKS:
        assert f"[{task.id}]" in message
    root = tmp_path / "none"
    assert (
        f"hf download djghosh/wds_imagenet1k_test --repo-type dataset --local-dir {root}/wds_imagenet1k_test" in message
    )
    assert f"{root}/wds_vtab-caltech101_test" in message and f"{root}/wds_dollar_street_test" in message
    assert f"{root}/hf_cache/nlphuji___flickr_1k_test_image_text_retrieval" in message
    assert "load_dataset('nlphuji/winogavil', split='test'" in message
    assert "download_evalsets.py" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ resume


def _counting_evaluators(monkeypatch):
    calls = []
    for kind, fn in list(runner.EVALUATORS.items()):

        def wrapped(task, *args, _fn=fn):
            calls.append(task.id)
            return _fn(task, *args)

        monkeypatch.setitem(runner.EVALUATORS, kind, wrapped)
    return calls


def test_resume_redoes_only_missing_or_broken_tasks(tiny_run, model_dir, synth_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    (out / "synth_colour.json").unlink()
    (out / "synth_position.json").write_text('{"dataset": "wds/synth_position", "metr')  # torn by hand
    kept = {t: (out / f"{t}.json").read_bytes() for t in ("synth_shape", "synth_retrieval")}
    data = tmp_path / "data"  # finished tasks need no data any more
    shutil.copytree(synth_data, data)
    shutil.rmtree(data / "eval" / "wds_synth_shape")
    calls = _counting_evaluators(monkeypatch)
    summary = evaluate_suite(model_dir, "tiny", data, out, **EVAL)
    assert calls == ["synth_colour", "synth_position"]
    assert {t: (out / f"{t}.json").read_bytes() for t in kept} == kept
    assert summary == tiny_run[1]


def test_finished_suite_does_no_work(tiny_run, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    _forbid_model_loading(monkeypatch)
    summary = evaluate_suite(model_dir, "tiny", tmp_path / "no-data-needed", out, **EVAL)
    assert summary == tiny_run[1]


def test_crash_mid_suite_keeps_finished_tasks_and_resumes(model_dir, synth_data, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*args):
        raise RuntimeError("node lost")

    monkeypatch.setitem(runner.EVALUATORS, "retrieval", boom)
    with pytest.raises(RuntimeError, match="node lost"):
        evaluate_suite(model_dir, "tiny", synth_data, out, **EVAL)
    assert sorted(p.name for p in out.iterdir()) == ["synth_colour.json", "synth_position.json", "synth_shape.json"]
    monkeypatch.undo()
    calls = _counting_evaluators(monkeypatch)
    summary = evaluate_suite(model_dir, "tiny", synth_data, out, **EVAL)
    assert calls == ["synth_retrieval"] and set(summary["tasks"]) == set(GROUPS["tiny"])


def test_results_of_another_model_are_refused_unless_redo(tiny_run, synth_data, tmp_path):
    from neuclip.export import create_model, save_model

    torch.manual_seed(1)
    other = save_model(create_model("tiny-vit")[0], "tiny-vit", tmp_path / "other")
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    with pytest.raises(ForeignResultsError, match="other model weights"):
        evaluate_suite(other, "tiny", synth_data, out, **EVAL)
    summary = evaluate_suite(other, "tiny", synth_data, out, redo=True, **EVAL)
    assert summary["model_dir"] == str(other.resolve())
    sha = json.loads((out / "synth_shape.json").read_text())["neuclip"]["model_sha256"]
    assert sha == runner.model_fingerprint(other)


# ------------------------------------------------------------------------------ task fingerprints

FP32 = {"text": False, "image": False}  # the autocast plan of the default precision on CPU


def test_changed_task_definition_is_recomputed_and_same_definition_reused(
    tiny_run, model_dir, synth_data, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    kept = (out / "synth_colour.json").read_bytes()
    changed = dataclasses.replace(TASKS["synth_shape"], size=999)  # as DataComp's Flickr fix changed its size
    monkeypatch.setitem(suites.TASKS, "synth_shape", changed)
    calls = _counting_evaluators(monkeypatch)
    capsys.readouterr()

    evaluate_suite(model_dir, "tiny", synth_data, out, **EVAL)
    assert calls == ["synth_shape"]
    err = capsys.readouterr().err
    assert "neuclip eval: recomputing synth_shape" in err and "task.size: null -> 999" in err
    assert err.count("recomputing") == 1 and (out / "synth_colour.json").read_bytes() == kept
    record = json.loads((out / "synth_shape.json").read_text())["neuclip"]
    assert record["task_definition"] == runner.task_definition(changed, FP32)
    assert record["task_sha256"] == runner.definition_sha256(runner.task_definition(changed, FP32))

    calls.clear()  # the same definition again: reused
    evaluate_suite(model_dir, "tiny", synth_data, out, **EVAL)
    assert calls == [] and "recomputing" not in capsys.readouterr().err

    # A display-only field (the name) does not define the task: still reused.
    monkeypatch.setitem(suites.TASKS, "synth_shape", dataclasses.replace(changed, name="Shapes, renamed"))
    summary = evaluate_suite(model_dir, "tiny", synth_data, out, **EVAL)
    assert calls == [] and summary["tasks"]["synth_shape"]["name"] == "Shapes, renamed"


def test_result_without_task_fingerprint_is_recomputed(tiny_run, model_dir, synth_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    old = json.loads((out / "synth_colour.json").read_text())
    del old["neuclip"]["task_sha256"], old["neuclip"]["task_definition"]  # as written before fingerprints
    (out / "synth_colour.json").write_text(json.dumps(old))
    calls = _counting_evaluators(monkeypatch)
    capsys.readouterr()
    summary = evaluate_suite(model_dir, "tiny", synth_data, out, **EVAL)
    assert calls == ["synth_colour"] and "synth_colour" in (err := capsys.readouterr().err)
    assert "no task fingerprint" in err
    assert summary == tiny_run[1]


def test_other_precision_is_recomputed(tiny_run, model_dir, synth_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    calls = _counting_evaluators(monkeypatch)
    capsys.readouterr()
    summary = evaluate_suite(model_dir, "tiny", synth_data, out, **(EVAL | {"precision": "amp"}))
    assert calls == list(GROUPS["tiny"])
    assert capsys.readouterr().err.count("amp.image: false -> true") == 4
    for task in GROUPS["tiny"]:
        record = json.loads((out / f"{task}.json").read_text())["neuclip"]
        assert record["precision"] == "amp" and record["amp"] == {"text": True, "image": True}
        assert 0.0 <= summary["tasks"][task]["value"] <= 1.0
    with pytest.raises(ValueError, match="choose from datacomp, fp32, amp"):
        evaluate_suite(model_dir, "tiny", synth_data, out, **(EVAL | {"precision": "fp16"}))


@pytest.mark.parametrize(
    "plan",
    [{"text": True, "image": False}, {"text": False, "image": False}, {"text": True, "image": True}],
    ids=["datacomp-classification-on-cuda", "fp32", "amp"],
)
def test_each_encoder_pass_runs_at_its_planned_precision(model_dir, synth_data, plan):
    """The flags reach the passes they name (CPU autocast stands in for CUDA's: the evaluators only pass them on)."""
    from neuclip.export import load_model

    model, transform, tokenizer = load_model(model_dir)
    seen = {"text": set(), "image": set()}
    for side in seen:
        encode = getattr(model, f"encode_{side}")

        def recorded(*args, _encode=encode, _side=side, **kwargs):
            seen[_side].add(torch.is_autocast_enabled("cpu"))
            return _encode(*args, **kwargs)

        setattr(model, f"encode_{side}", recorded)
    args = (model, transform, tokenizer, synth_data, 8, 0, "cpu", plan)
    metrics = runner.EVALUATORS["classification"](TASKS["synth_shape"], *args)
    assert seen == {"text": {plan["text"]}, "image": {plan["image"]}} and 0.0 <= metrics["acc1"] <= 1.0
    if plan["text"] == plan["image"]:
        seen = {"text": set(), "image": set()}
        runner.EVALUATORS["retrieval"](TASKS["synth_retrieval"], *args)
        assert seen == {"text": {plan["text"]}, "image": {plan["image"]}}
    else:
        with pytest.raises(ValueError, match="one precision"):
            runner.EVALUATORS["retrieval"](TASKS["synth_retrieval"], *args)


# ------------------------------------------------------------------------------ DataComp machinery (fake data)


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _npy(values) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.int64))
    return buf.getvalue()


def _fake_wds_set(folder, rng, n=10, classes=6, metadata=False, shards=1):
    (folder / "test").mkdir(parents=True)
    from neuclip.data.shards import write_tar

    samples = []
    for i in range(n):
        fields = {"png": _png(rng), "cls": str(int(rng.integers(classes))).encode()}
        if metadata:
            fields["npy"] = _npy(rng.integers(0, 3, size=3))
        samples.append((f"s{i:04d}", fields))
    per = -(-n // shards)
    for s in range(shards):
        write_tar(folder / "test" / f"{s}.tar", samples[s * per : (s + 1) * per])
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("".join(f"{folder.name} thing {c}\n" for c in range(classes)))
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")


@pytest.fixture(scope="module")
def fake_datacomp(tmp_path_factory):
    """A DataComp-layout data root with tiny stand-ins for all 38 sets, plus fake HF rows for the 3 HF sets."""
    root = tmp_path_factory.mktemp("datacomp")
    rng = np.random.default_rng(0)
    for t in DATACOMP_TASKS:
        if t.source == "hf":
            cache = root / "hf_cache" / t.dataset.replace("/", "___")
            cache.mkdir(parents=True)
            (cache / "stand-in").write_text("")
        elif t.id == "geode":
            continue  # below: a copy of Stanford Cars plus metadata
        else:
            _fake_wds_set(root / t.folder, rng, metadata=t.kind == "wilds", shards=2 if t.id == "cifar10" else 1)
    # GeoDE = the Cars stand-in's images and labels, with metadata: its acc1 must equal Cars' (one-pass alignment).
    cars, geode = root / TASKS["cars"].folder, root / TASKS["geode"].folder
    shutil.copytree(cars, geode)
    from neuclip.data.shards import write_tar

    samples = read_wds(cars)
    write_tar(
        geode / "test" / "0.tar",
        ((f"s{i:04d}", s | {"npy": _npy([int(s["cls"]) % 2, 0])}) for i, s in enumerate(samples)),
    )

    def image():
        return Image.open(io.BytesIO(_png(rng)))

    def wino(n, cue):
        candidates = [f"w{j}" for j in range(n)]
        return {
            "candidate_images": [image() for _ in range(n)],
            "cue": cue,
            "candidates": candidates,
            "associations": candidates[::3],
        }

    hf = {
        "nlphuji/flickr_1k_test_image_text_retrieval": [
            {"image": image(), "caption": [f"c{i} {j}" for j in range(5)]} for i in range(12)
        ],
        "nlphuji/mscoco_2014_5k_test_image_text_retrieval": [
            {"image": image(), "caption": [f"m{i} {j}" for j in range(5)]} for i in range(12)
        ],
        "nlphuji/winogavil": [wino(n, cue) for n, cue in [(5, "apple"), (6, "dog"), (10, "ice"), (12, "sun")]],
    }
    return root, hf


def test_datacomp38_runs_all_tasks_and_averages_like_datacomp(model_dir, fake_datacomp, tmp_path, monkeypatch):
    root, hf = fake_datacomp
    monkeypatch.setattr("neuclip.eval.data.datasets_installed", lambda: True)
    monkeypatch.setattr("neuclip.eval.data.load_hf", lambda task, data_root: hf[task.dataset])
    out = tmp_path / "out"
    summary = evaluate_suite(model_dir, "datacomp38", root, out, **(EVAL | {"batch_size": 4, "workers": 1}))

    assert list(summary["tasks"]) == [t.id for t in DATACOMP_TASKS]
    for t in DATACOMP_TASKS:
        result = json.loads((out / f"{t.id}.json").read_text())
        value = result["metrics"][t.main_metric]
        assert summary["tasks"][t.id]["value"] == value and 0.0 <= value <= 1.0, t.id
    main = {t: summary["tasks"][t]["value"] for t in summary["tasks"]}
    assert summary["groups"]["datacomp38"] == pytest.approx(np.mean(list(main.values())))
    assert summary["groups"]["imagenet_variants"] == pytest.approx(np.mean([main[t] for t in IMAGENET_VARIANTS]))
    assert summary["groups"]["retrieval"] == pytest.approx(np.mean([main[t] for t in RETRIEVAL]))
    assert summary["groups"]["tiny"] is None

    metrics = {t: json.loads((out / f"{t}.json").read_text())["metrics"] for t in ("cars", "geode", "flickr30k")}
    assert metrics["geode"]["acc1"] == metrics["cars"]["acc1"]
    assert metrics["geode"]["mean_per_class_recall"] == metrics["cars"]["mean_per_class_recall"]
    assert metrics["geode"]["acc_wg"] <= metrics["geode"]["acc_avg"] == pytest.approx(metrics["geode"]["acc1"])
    f = metrics["flickr30k"]
    assert f["mean_recall@1"] == pytest.approx((f["image_retrieval_recall@1"] + f["text_retrieval_recall@1"]) / 2)

    # The ImageNet suite over the same folder finds every task done and loads nothing.
    _forbid_model_loading(monkeypatch)
    variants = evaluate_suite(model_dir, "imagenet_variants", root, out, **EVAL)
    assert list(variants["tasks"]) == list(IMAGENET_VARIANTS)
    assert variants["groups"]["imagenet_variants"] == summary["groups"]["imagenet_variants"]
    assert variants["groups"]["datacomp38"] is None


def test_flickr_result_of_the_full_set_is_recomputed(model_dir, fake_datacomp, tmp_path, monkeypatch, capsys):
    """A Flickr result cached from the 31,014-image task (DataComp before May 2023) reruns by itself."""
    root, hf = fake_datacomp
    monkeypatch.setattr("neuclip.eval.data.datasets_installed", lambda: True)
    monkeypatch.setattr("neuclip.eval.data.load_hf", lambda task, data_root: hf[task.dataset])
    out = tmp_path / "out"
    evaluate_suite(model_dir, "retrieval", root, out, **EVAL)
    path = out / "flickr30k.json"
    result = json.loads(path.read_text())
    full = dataclasses.replace(
        TASKS["flickr30k"], datacomp_key="retrieval/flickr30k", dataset="nlphuji/flickr30k", size=31014
    )
    result["neuclip"]["task_definition"] = runner.task_definition(full, FP32)
    result["neuclip"]["task_sha256"] = runner.definition_sha256(result["neuclip"]["task_definition"])
    path.write_text(json.dumps(result))
    calls = _counting_evaluators(monkeypatch)
    capsys.readouterr()
    evaluate_suite(model_dir, "retrieval", root, out, **EVAL)
    assert calls == ["flickr30k"]
    err = capsys.readouterr().err
    assert "task.size: 31014 -> 1000" in err
    assert 'task.dataset: "nlphuji/flickr30k" -> "nlphuji/flickr_1k_test_image_text_retrieval"' in err
    assert json.loads(path.read_text())["neuclip"]["task_definition"]["task"]["size"] == 1000
