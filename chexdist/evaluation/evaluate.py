"""`chexdist evaluate`: the honest test-set report of an exported run, and the paired comparison of two.

Honest means: thresholds come from best.json (tuned on VALIDATION, never on the split scored here),
confidence intervals resample PATIENTS, every sample of the split is scored exactly once (also under
`accelerate launch` with N processes), and published numbers are shown with the split they were
measured on. Reads only what training exported; never imports the training loop.

`runs/NAME/eval-<split>/` holds metrics.json, per_class.csv, predictions.csv, report.md and, with
matplotlib installed, roc.png, pr.png and calibration.png.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from chexdist import __version__
from chexdist.errors import ChexdistError
from chexdist.utils.fileio import atomic_save_figure, atomic_write_text
from chexdist.evaluation.inference import load_run, predict_split
from chexdist.labels import LABELS
from chexdist.evaluation.metrics import (
    bootstrap_ci,
    curve_points,
    delong_test,
    paired_bootstrap_auc,
    per_class_metrics,
    reliability,
    threshold_array,
    tune_thresholds,
)
from chexdist.data.lineage import check_no_training_overlap
from chexdist.data.mixture import load_sources
from chexdist.data.shardformat import dataset_name, split_shards

METRICS = ("auc", "ap", "f1", "precision", "recall", "specificity")
METRIC_NAMES = {"auc": "AUROC", "ap": "AP", "f1": "F1", "precision": "precision", "recall": "recall",
                "specificity": "specificity"}
PUBLISHED = Path(__file__).with_name("published.json")
PREDICTIONS = "predictions.csv"


def eval_dir(run: str | os.PathLike, split: str, checkpoint: str | None = "best") -> Path:
    """runs/NAME/eval-<split> for the best model; eval-<split>-<stem> for another checkpoint file."""
    suffix = "" if checkpoint in (None, "", "best") else f"-{Path(checkpoint).stem}"
    return Path(run) / f"eval-{split}{suffix}"


def load_published(path: str | os.PathLike = PUBLISHED) -> list[dict[str, Any]]:
    """The published per-class AUROCs shipped with chexdist, each with its citation and split."""
    data = json.loads(Path(path).read_text())
    for entry in data["results"]:
        missing = [k for k in ("key", "name", "citation", "split", "auroc") if k not in entry]
        unknown = sorted(set(entry.get("auroc", {})) - set(LABELS))
        if missing or unknown:
            raise ChexdistError(f"{path}: entry {entry.get('key')!r} lacks {missing} or names unknown labels {unknown}")
    return data["results"]


# ------------------------------------------------------------------------------------- JSON shaping


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _null_reason(metric: str, positives: int, negatives: int) -> str | None:
    if positives == 0 and negatives == 0:
        return "not labelled in this split's dataset (unknown in every sample)"
    if positives == 0 and metric in ("auc", "ap", "f1", "precision", "recall"):
        return "no positives in this split: undefined"
    if negatives == 0 and metric in ("auc", "ap", "specificity"):
        return "no negatives in this split: undefined"
    return None


def _scored(point: float, ci: dict | None, key: str, name: str | None, reason: str | None) -> dict[str, Any] | None:
    """{"value", "ci", "ci_resamples"} or None (the caller records the reason)."""
    if reason is not None or _num(point) is None:
        return None
    entry: dict[str, Any] = {"value": float(point)}
    if ci is not None:
        interval = ci[key][name] if name is not None else ci[f"{key}_mean"]
        used = ci["n_used"][key][name] if name is not None else ci["n_used"][f"{key}_mean"]
        bounds = [_num(interval[0]), _num(interval[1])]
        entry["ci"] = bounds if used and None not in bounds else None
        entry["ci_resamples"] = int(used)
        if entry["ci"] is None:
            entry["ci_null_reason"] = ("no resample could score it" if not used else
                                       "BCa undefined: some patient resamples or jackknife samples cannot score it")
    return entry


def summarize(probs: np.ndarray, targets: np.ndarray, patients: np.ndarray, thresholds: Any, n_boot: int = 1000,
              seed: int = 0, level: float = 0.95, labels=LABELS, ci_method: str = "percentile") -> dict[str, Any]:
    """Point metrics at the given (validation-tuned) thresholds, patient-bootstrap CIs, the clearly
    optimistic test-tuned F1, and calibration; strict-JSON ready (undefined values are null with a reason)."""
    t = threshold_array(thresholds, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        point = per_class_metrics(probs, targets, t, labels)
        ci = bootstrap_ci(probs, targets, patients, t, n_boot=n_boot, seed=seed, level=level, labels=labels,
                          method=ci_method) if n_boot else None
        test_tuned = tune_thresholds(probs, targets, labels=labels)
        optimistic = per_class_metrics(probs, targets, test_tuned, labels)
    n = len(targets)
    per_class: dict[str, Any] = {}
    for j, name in enumerate(labels):
        pos, neg = int(point["positives"][name]), int(point["negatives"][name])
        entry: dict[str, Any] = {"positives": pos, "negatives": neg, "unknown": n - pos - neg, "threshold": float(t[j])}
        reasons = {}
        for key in METRICS:
            reason = _null_reason(key, pos, neg)
            entry[key] = _scored(point[key][name], ci, key, name, reason)
            if entry[key] is None:
                reasons[key] = reason or "undefined"
        if reasons:
            entry["null_reasons"] = reasons
        per_class[name] = entry
    macro = {key: _scored(point[f"{key}_mean"], ci, key, None, None) for key in METRICS}
    calibration = reliability(probs, targets, labels=labels)
    return {
        "samples": n,
        "patients": int(len(np.unique(patients))),
        "per_class": per_class,
        "macro": macro,
        "macro_over": {key: [name for name in labels if per_class[name][key] is not None] for key in METRICS},
        "not_scored": {name: per_class[name]["null_reasons"]["auc"] for name in labels
                       if per_class[name]["auc"] is None},
        "bootstrap": None if ci is None else {
            "method": ci["method"], "resampling": "patients", "n_boot": ci["n_boot"], "level": ci["level"],
            "seed": ci["seed"], "patients": ci["n_groups"],
        },
        "optimistic_test_tuned": {
            "warning": "OPTIMISTIC: thresholds tuned on this very split (as some papers report); not a test result",
            "thresholds": {name: float(v) for name, v in zip(labels, test_tuned)},
            "f1": {name: _num(v) for name, v in optimistic["f1"].items()},
            "f1_mean": _num(optimistic["f1_mean"]),
        },
        "calibration": {
            "bins": calibration["bins"],
            "ece": {name: _num(v) for name, v in calibration["ece"].items()},
            "ece_mean": _num(calibration["ece_mean"]),
        },
        "_reliability": calibration,
    }


# --------------------------------------------------------------------------------------- writers


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def per_class_csv(summary: dict[str, Any], labels=LABELS) -> str:
    header = ["label", "positives", "negatives", "threshold"]
    for key in METRICS:
        header += [key, f"{key}_lo", f"{key}_hi"]
    rows = []
    for name in [*labels, "macro"]:
        entry = summary["per_class"][name] if name != "macro" else summary["macro"]
        row: list[Any] = [name]
        row += ["", "", ""] if name == "macro" else [entry["positives"], entry["negatives"], _fmt(entry["threshold"], 6)]
        for key in METRICS:
            scored = entry[key]
            ci = (scored or {}).get("ci") or [None, None]
            row += [_fmt(scored["value"], 6) if scored else "", _fmt(ci[0], 6), _fmt(ci[1], 6)]
        rows.append(row)
    return _csv_text(header, rows)


def predictions_csv(keys: list[str], patients: np.ndarray, probs: np.ndarray, targets: np.ndarray, labels=LABELS) -> str:
    """One row per image; an unknown label (NaN) is a blank cell."""
    header = ["image", "patient_id", *[f"prob_{n}" for n in labels], *[f"label_{n}" for n in labels]]
    rows = [[k, int(pid), *[f"{v:.17g}" for v in p], *["" if np.isnan(v) else int(v) for v in y]]
            for k, pid, p, y in zip(keys, patients, probs, np.asarray(targets, dtype=np.float64))]
    return _csv_text(header, rows)


def read_predictions(path: str | os.PathLike, labels=LABELS) -> dict[str, Any]:
    """predictions.csv back as arrays (keys, patients, probs [N, C], targets [N, C]); refuses other labels."""
    path = Path(path)
    if not path.is_file():
        raise ChexdistError(f"{path}: not found; run chexdist evaluate on that run first")
    import pandas as pd

    table = pd.read_csv(path, dtype={"image": str})
    expected = ["image", "patient_id", *[f"prob_{n}" for n in labels], *[f"label_{n}" for n in labels]]
    if list(table.columns) != expected:
        raise ChexdistError(f"{path}: columns differ from chexdist's (label order or version); re-run chexdist evaluate")
    return {
        "keys": table["image"].tolist(),
        "patients": table["patient_id"].to_numpy(),
        "probs": table[[f"prob_{n}" for n in labels]].to_numpy(dtype=np.float64),
        "targets": table[[f"label_{n}" for n in labels]].to_numpy(dtype=np.float64),  # blank -> NaN (unknown)
    }


def _ci_text(scored: dict | None) -> str:
    if scored is None:
        return "n/a"
    ci = scored.get("ci")
    return f"{scored['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")


def report_markdown(result: dict[str, Any], published: list[dict[str, Any]], plots: list[str], labels=LABELS) -> str:
    s = result["summary"]
    boot = s["bootstrap"]
    lines = [
        f"# Evaluation of `{result['run']}` on the {result['split']} split",
        "",
        f"- model: {result['arch']} ({result['weights']}), epoch {result.get('epoch')}; chexdist {__version__}",
        f"- data: `{result['shards']}` split `{result['split']}`: {s['samples']} images of {s['patients']} patients"
        f" ({result['skipped']} unreadable, skipped and counted); {result['world_size']} process(es)",
        f"- thresholds: {result['thresholds_source']}",
    ]
    if boot:
        lines.append(f"- {boot['level']:.0%} CIs: {'BCa' if boot['method'] == 'bca' else 'percentile'} bootstrap, {boot['n_boot']} resamples of the {boot['patients']} "
                     f"patients (all images of a drawn patient), seed {boot['seed']}")
    else:
        lines.append("- no confidence intervals (--bootstrap 0)")
    for note in result["notes"]:
        lines.append(f"- **note:** {note}")
    lines += ["", "## Per class", "", "| finding | positives | negatives | threshold | " + " | ".join(METRIC_NAMES[k] for k in METRICS)
              + " | AUROC CI resamples |", "|---|---:|---:|---:|" + "---|" * len(METRICS) + "---:|"]
    for name in labels:
        e = s["per_class"][name]
        used = (e["auc"] or {}).get("ci_resamples", "")
        lines.append(f"| {name} | {e['positives']} | {e['negatives']} | {e['threshold']:.3f} | "
                     + " | ".join(_ci_text(e[k]) for k in METRICS) + f" | {used} |")
    lines.append("| **macro** | | | | " + " | ".join(_ci_text(s["macro"][k]) for k in METRICS)
                 + f" | {(s['macro']['auc'] or {}).get('ci_resamples', '')} |")
    if s.get("not_scored"):
        lines += ["", "## Findings not scored", ""] + [f"- {name}: {why}" for name, why in s["not_scored"].items()]
    unscored = {k: [n for n in labels if s["per_class"][n][k] is None] for k in METRICS}
    if any(unscored.values()):
        lines += ["", "Undefined cells (n/a) are left out of the macro means: "
                  + "; ".join(f"{METRIC_NAMES[k]}: {', '.join(v)}" for k, v in unscored.items() if v) + "."]
    opt = s["optimistic_test_tuned"]
    lines += ["", "## Optimistic extra: F1 with thresholds tuned on this split", "",
              "**Not a test result.** Some papers tune each class's threshold on the test set and report that F1; "
              "shown only so such numbers can be compared like with like.", "",
              f"mean F1 at test-tuned thresholds: {_fmt(opt['f1_mean'], 3)} (vs {_ci_text(s['macro']['f1'])} at the "
              "validation-tuned thresholds above)"]
    lines += ["", "## Published per-class AUROC", "",
              "Different papers used different splits (listed below the table); only rows measured on the same images "
              "are strictly comparable. Pack a peer's split with `chexdist pack --split lists`.", "",
              "| finding | this run | " + " | ".join(p["name"] for p in published) + " |",
              "|---|---|" + "---:|" * len(published)]
    for name in labels:
        cells = [_fmt(p["auroc"].get(name), 4) or "-" for p in published]
        lines.append(f"| {name} | {_ci_text(s['per_class'][name]['auc'])} | " + " | ".join(cells) + " |")
    means = [f"{np.mean([p['auroc'][n] for n in labels]):.4f}" if all(n in p["auroc"] for n in labels) else "-" for p in published]
    lines.append(f"| **mean** | {_ci_text(s['macro']['auc'])} | " + " | ".join(means) + " |")
    lines += [""]
    for p in published:
        lines.append(f"- **{p['name']}**: {p['citation']}. Split: {p['split']}. Read from: {p.get('read_from', p['citation'])}.")
    lines += ["", "## Calibration", "",
              f"Expected calibration error (10 bins), mean over classes: {_fmt(s['calibration']['ece_mean'], 4)}."]
    if plots:
        lines += ["", "## Figures", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _panels(title: str):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 5, figsize=(17, 10.5), constrained_layout=True)
    fig.suptitle(title)
    return plt, fig, axes.ravel()


def draw_figures(out: Path, probs: np.ndarray, targets: np.ndarray, summary: dict[str, Any], title: str,
                 labels=LABELS) -> list[str]:
    """roc.png, pr.png (14 panels each) and calibration.png."""
    figures = {"roc.png": "ROC", "pr.png": "precision-recall", "calibration.png": "reliability"}
    for filename, kind in figures.items():
        plt, fig, axes = _panels(f"{title}: {kind}")
        for j, name in enumerate(labels):
            ax = axes[j]
            entry = summary["per_class"][name]
            ax.set_title(name, fontsize=10)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            if kind == "reliability":
                rel = summary["_reliability"]["per_class"][name]
                mean_p, observed = np.array(rel["mean_prob"], float), np.array(rel["observed"], float)
                kept = ~np.isnan(mean_p)
                ax.plot([0, 1], [0, 1], color="0.7", lw=1)
                ax.plot(mean_p[kept], observed[kept], marker="o", lw=1.5)
                ax.set_xlabel("mean predicted", fontsize=8)
                ax.set_ylabel("observed rate", fontsize=8)
                ece = summary["calibration"]["ece"][name]
                ax.text(0.03, 0.92, "ECE n/a (unknown)" if ece is None else f"ECE {ece:.3f}", fontsize=8, transform=ax.transAxes)
                continue
            if entry["auc"] is None:
                ax.text(0.5, 0.5, "undefined\n(" + entry["null_reasons"]["auc"] + ")", ha="center", va="center", fontsize=8, wrap=True)
                continue
            known = ~np.isnan(targets[:, j])
            pts = curve_points(probs[known, j], targets[known, j])
            if kind == "ROC":
                ax.plot([0, 1], [0, 1], color="0.7", lw=1)
                ax.plot(pts["fpr"], pts["tpr"], lw=1.5)
                ax.set_xlabel("1 - specificity", fontsize=8)
                ax.set_ylabel("sensitivity", fontsize=8)
                ax.text(0.45, 0.06, f"AUROC {_ci_text(entry['auc'])}", fontsize=8, transform=ax.transAxes)
            else:
                ax.step(pts["recall"], pts["precision"], where="post", lw=1.5)
                ax.axhline(entry["positives"] / (entry["positives"] + entry["negatives"]), color="0.7", lw=1)
                ax.set_xlabel("recall", fontsize=8)
                ax.set_ylabel("precision", fontsize=8)
                ax.text(0.35, 0.92, f"AP {_ci_text(entry['ap'])}", fontsize=8, transform=ax.transAxes)
        axes[-1].axis("off")
        atomic_save_figure(fig, out / filename, dpi=90)
        plt.close(fig)
    return list(figures)


def _strict_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


# ------------------------------------------------------------------------------------- evaluate


def _accelerator():
    from chexdist.utils.distributed import make_accelerator

    return make_accelerator()


def external_dataset(info: dict[str, Any], manifest: dict[str, Any]) -> tuple[str, str] | None:
    """(trained on, scored on) when the shards hold another dataset than the run was trained on."""
    trained = info.get("shards") or {}
    names = trained.get("datasets") or [dataset_name(trained)]
    here = dataset_name(manifest)
    return None if here in names else ("+".join(map(str, names)), here)


def _split_notes(split: str, info: dict[str, Any], manifest: dict[str, Any], tuned: bool) -> list[str]:
    notes = []
    if split == "val":
        notes.append("the thresholds were tuned on this validation split: F1/precision/recall/specificity are optimistic")
    elif split == "train":
        notes.append("scored on the TRAINING split: every number is optimistic")
    if not tuned:
        notes.append("thresholds are 0.5 for every class, not tuned (imported checkpoint): F1 is not comparable with a val-tuned F1")
    external = external_dataset(info, manifest)
    trained = info.get("shards")
    if external:
        notes.append(
            f"external validation: trained on {external[0]}, scored on {external[1]}; the thresholds are the ones tuned on "
            f"the training data's validation split ({external[0]}), not on {external[1]}; findings {external[1]} does not "
            "label are not scored"
        )
    elif trained and (trained.get("split") != manifest.get("split") or trained.get("source") != manifest.get("source")):
        notes.append(
            "these shards were packed with another split or CSV than the run was trained on "
            f"(trained: {json.dumps(trained.get('split'))}, here: {json.dumps(manifest.get('split'))}); "
            "the test patients may have been seen in training"
        )
    return notes


def evaluate_run(run: str | os.PathLike, split: str = "test", checkpoint: str | None = "best",
                 shards: str | None = None, n_boot: int | None = None, out: str | os.PathLike | None = None,
                 seed: int = 0, level: float | None = None, progress: bool = True, plots: bool = True,
                 ci_method: str = "percentile", accelerator=None) -> dict[str, Any] | None:
    """Score `run` on `split`; the main process writes the report and returns its metrics, other
    ranks return None. Works in 1 process or under `accelerate launch` (each sample scored once).
    `n_boot` and `level` default to the run's own `eval.bootstrap` and `eval.ci_level`."""
    loaded = load_run(run, checkpoint)
    n_boot = loaded.config.eval.bootstrap if n_boot is None else n_boot
    level = loaded.config.eval.ci_level if level is None else level
    if not 0 < level < 1:
        raise ChexdistError(f"--level {level!r}: the confidence level must be between 0 and 1, e.g. 0.95")
    shards = shards or loaded.config.data.shards
    if not shards:
        raise ChexdistError(f"{loaded.weights}: the run records no shard folder (an imported checkpoint); pass --shards DIR")
    manifest = load_sources(shards)  # one folder, or the union a mixture run trained on
    split_shards(manifest, split, str(shards))
    if manifest["splits"][split]["samples"] == 0:
        raise ChexdistError(f"{shards}: the {split} split has no samples; pick another --split")
    check_no_training_overlap(run, shards, split)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ChexdistError(f"--bootstrap {n_boot!r}: must be an integer >= 0 (0 = no confidence intervals)")
    out = Path(out) if out is not None else eval_dir(run, split, checkpoint)
    accelerator = accelerator or _accelerator()
    model = loaded.model.to(accelerator.device)
    preds = predict_split(model, accelerator, shards, split, loaded.config, manifest,
                          transform=loaded.transform, with_keys=True, progress=progress)
    if not accelerator.is_main_process:
        return None
    if len(preds.targets) == 0:
        raise ChexdistError(f"{shards}: no readable sample in the {split} split ({preds.skipped} skipped)")
    probs, targets = preds.probs.astype(np.float64), preds.targets.numpy().astype(np.float64)  # NaN: unknown
    patients = preds.patient_id.numpy()
    summary = summarize(probs, targets, patients, loaded.thresholds, n_boot=n_boot, seed=seed, level=level, ci_method=ci_method)
    tuned = loaded.thresholds_tuned
    result: dict[str, Any] = {
        "run": str(run),
        "weights": str(loaded.weights),
        "arch": loaded.info["arch"],
        "epoch": loaded.info.get("epoch"),
        "split": split,
        "shards": str(shards),
        "labels": list(LABELS),
        "skipped": preds.skipped,
        "world_size": accelerator.num_processes,
        "thresholds_tuned": tuned,
        "thresholds_source": ("best.json: tuned for max F1 on the VALIDATION split during training" if tuned
                              else "0.5 for every class (imported checkpoint; not tuned)"),
        "notes": _split_notes(split, loaded.info, manifest, tuned),
        "dataset": dataset_name(manifest),
        "external": (lambda e: None if e is None else {"trained_on": e[0], "scored_on": e[1]})(external_dataset(loaded.info, manifest)),
        "chexdist_version": __version__,
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(out, probs, targets, summary, f"{Path(run).name} ({split})") if plots else []
    result["figures"] = figures
    published = load_published()
    public = {k: v for k, v in result.items() if k != "summary"}
    public.update({k: v for k, v in summary.items() if not k.startswith("_")})
    atomic_write_text(out / "metrics.json", _strict_json(public))
    atomic_write_text(out / "per_class.csv", per_class_csv(summary))
    atomic_write_text(out / PREDICTIONS, predictions_csv(preds.keys, patients, probs, targets))
    atomic_write_text(out / "report.md", report_markdown(result, published, figures))
    public["out"] = str(out)
    return public


# -------------------------------------------------------------------------------------- compare


def _aligned(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> tuple[dict, dict]:
    """Both prediction tables ordered by image key; refuses different images, labels or patients."""
    keys_a, keys_b = set(a["keys"]), set(b["keys"])
    if len(keys_a) != len(a["keys"]) or len(keys_b) != len(b["keys"]):
        raise ChexdistError(f"{name_a if len(keys_a) != len(a['keys']) else name_b}: predictions.csv lists an image twice")
    if keys_a != keys_b:
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)
        raise ChexdistError(
            f"{name_a} and {name_b} were scored on different images ({len(only_a)} only in the first"
            f"{', e.g. ' + only_a[0] if only_a else ''}; {len(only_b)} only in the second{', e.g. ' + only_b[0] if only_b else ''}); "
            "evaluate both on the same shards and split (--shards)"
        )

    def ordered(t: dict[str, Any]) -> dict[str, Any]:
        order = np.argsort(np.asarray(t["keys"], dtype=object).astype(str), kind="stable")
        return {"keys": [t["keys"][i] for i in order], "patients": t["patients"][order], "probs": t["probs"][order],
                "targets": t["targets"][order]}

    a, b = ordered(a), ordered(b)
    if not np.array_equal(a["targets"], b["targets"], equal_nan=True) or not np.array_equal(a["patients"], b["patients"]):
        raise ChexdistError(f"{name_a} and {name_b}: the same images carry different labels or patient ids; repack or re-evaluate on the same shards")
    return a, b


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, split: str = "test", n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Is B better than A? Paired patient bootstrap of the AUROC difference (B - A) per class and
    macro, plus DeLong's test, on the identical images of both runs' eval-<split>/predictions.csv."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ChexdistError(f"--bootstrap {n_boot!r}: a comparison needs an integer >= 1")
    for run in (run_a, run_b):
        if not Path(run).is_dir():
            raise ChexdistError(f"{run}: no such run folder")
    path_a, path_b = eval_dir(run_a, split) / PREDICTIONS, eval_dir(run_b, split) / PREDICTIONS
    a, b = _aligned(read_predictions(path_a), read_predictions(path_b), str(path_a), str(path_b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paired = paired_bootstrap_auc(a["probs"], b["probs"], a["targets"], a["patients"], n_boot=n_boot, seed=seed, level=level)
        delong = delong_test(a["probs"], b["probs"], a["targets"])
    per_class = {}
    for name in LABELS:
        boot = paired["per_class"][name]
        d = delong[name]
        defined = _num(boot["diff"]) is not None
        per_class[name] = {
            "positives": int((a["targets"][:, LABELS.index(name)] == 1).sum()),
            "negatives": int((a["targets"][:, LABELS.index(name)] == 0).sum()),
            "auc_a": _num(boot["auc_a"]), "auc_b": _num(boot["auc_b"]), "diff": _num(boot["diff"]),
            "ci": [_num(v) for v in boot["ci"]] if boot["n_used"] else None,
            "p_boot": _num(boot["p_boot"]) if boot["n_used"] else None,
            "resamples": int(boot["n_used"]),
            "delong": {k: _num(d[k]) for k in ("se", "z", "p")} if _num(d["p"]) is not None else None,
        }
        if not defined:
            unknown = per_class[name]["positives"] + per_class[name]["negatives"] == 0
            per_class[name]["null_reason"] = ("unknown on every image (this dataset does not label it)" if unknown else
                                              "AUROC undefined (no positives or no negatives on these images)")
        elif per_class[name]["delong"] is None:
            per_class[name]["delong_null_reason"] = "DeLong needs at least 2 positives and 2 negatives"
    macro = paired["macro"]
    result = {
        "a": str(run_a), "b": str(run_b), "split": split, "images": len(a["keys"]),
        "patients": int(len(np.unique(a["patients"]))),
        "difference": "AUROC(b) - AUROC(a)",
        "bootstrap": {"method": "percentile", "resampling": "patients, paired (both models on the same resample)",
                      "n_boot": n_boot, "level": level, "seed": seed,
                      "p_value": "two-sided, 2 (k + 1) / (B + 1): never 0; its floor with B resamples is 2 / (B + 1)"},
        "macro": {"auc_a": _num(macro["auc_a"]), "auc_b": _num(macro["auc_b"]), "diff": _num(macro["diff"]),
                  "ci": [_num(v) for v in macro["ci"]], "p_boot": _num(macro["p_boot"]), "resamples": int(macro["n_used"])},
        "per_class": per_class,
        "delong_note": "DeLong's test (fast algorithm of Sun & Xu 2014) treats images as independent; "
                       "the paired patient bootstrap accounts for several images per patient",
    }
    out = Path(out) if out is not None else Path(run_b) / f"compare-{split}-vs-{Path(run_a).name}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", _strict_json(result))
    atomic_write_text(out / "compare.md", compare_markdown(result))
    result["out"] = str(out)
    return result


def p_text(p: float | None, resamples: int | None) -> str:
    """A bootstrap p-value with its resolution: at the floor 2/(B+1) it reads '<= 0.002 (B=1000)'."""
    if p is None or not resamples:
        return "n/a"
    floor = 2 / (resamples + 1)
    return f"<= {floor:.2g} (B={resamples})" if p <= floor * (1 + 1e-9) else f"{p:.3g}"


def compare_markdown(result: dict[str, Any]) -> str:
    lines = [f"# `{result['b']}` vs `{result['a']}` on the {result['split']} split", "",
             f"{result['images']} identical images of {result['patients']} patients. Difference = {result['difference']}; "
             f"{int(result['bootstrap']['level'] * 100)}% CI from {result['bootstrap']['n_boot']} paired patient resamples. "
             + result["delong_note"] + ". Bootstrap p-values are 2 (k + 1) / (B + 1), so the smallest possible "
             f"with these resamples is {2 / (result['bootstrap']['n_boot'] + 1):.2g}.", "",
             "| finding | AUROC a | AUROC b | b - a [CI] | p (bootstrap) | p (DeLong) |", "|---|---:|---:|---|---:|---:|"]

    def row(name: str, e: dict[str, Any]) -> str:
        ci = e.get("ci")
        diff = "n/a" if e["diff"] is None else f"{e['diff']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and None not in ci else "")
        delong = e.get("delong")
        return (f"| {name} | {_fmt(e['auc_a']) or 'n/a'} | {_fmt(e['auc_b']) or 'n/a'} | {diff} | "
                f"{p_text(e.get('p_boot'), e.get('resamples'))} | {_fmt(delong['p'], 4) if delong else 'n/a'} |")

    for name, e in result["per_class"].items():
        lines.append(row(name, e))
    lines.append(row("**macro**", result["macro"]))
    return "\n".join(lines) + "\n"
