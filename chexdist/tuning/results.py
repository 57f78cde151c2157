"""The outputs of a finished (or stopped) search, in the experiment folder: results.csv (one row per
trial, best epoch first), val_auc_per_epoch.png, params_vs_auc.png, best.yaml (the best trial's
config as a recipe) and the top-5 table `chexdist tune` prints."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from chexdist.config import apply_overrides, dump_config, load_config
from chexdist.tuning.options import METRIC, SearchPlan
from chexdist.tuning.trial import HISTORY_FILE
from chexdist.utils.fileio import atomic_save_figure, atomic_write_text

log = logging.getLogger("chexdist")


def write_outputs(grid, plan: SearchPlan) -> dict[str, Any]:
    """results.csv, val_auc_per_epoch.png, params_vs_auc.png, best.yaml and the top-5 table."""
    import pandas as pd

    out = Path(plan.experiment_dir)
    rows, curves = [], {}
    statuses = _ray_statuses(plan.experiment_dir)
    for result in grid:
        params = result.config or started_params(result.path)
        history = trial_history(result)
        trial_id = _trial_id(result)
        row: dict[str, Any] = {"trial": trial_id, "status": None}
        active = plan.space.active(params)
        for key in plan.space.params:
            row[key] = active.get(key)
        if history is not None and METRIC in history and history[METRIC].notna().any():
            curves[trial_id] = (history["epoch"].tolist(), history[METRIC].tolist())
            best = history.loc[history[METRIC].idxmax()]
            row.update(best_epoch=int(best["epoch"]), best_val_auc_mean=float(best[METRIC]),
                       best_val_f1_mean=float(best["val_f1_mean"]), best_val_ap_mean=float(best["val_ap_mean"]),
                       best_val_loss=float(best["val_loss"]), epochs=int(history["epoch"].max()),
                       wall_s=wall_seconds(result))
        else:
            row.update(best_epoch=None, best_val_auc_mean=None, best_val_f1_mean=None, best_val_ap_mean=None,
                       best_val_loss=None, epochs=0, wall_s=None)
        row["status"] = _status(result, statuses.get(trial_id), row["epochs"], plan.config.train.epochs)
        row["error"] = error_line(result.error)
        row["trial_dir"] = result.path
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("best_val_auc_mean", ascending=False, na_position="last").reset_index(drop=True)
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    _plots(out, curves, table, plan)
    best_recipe = None
    ok = table.dropna(subset=["best_val_auc_mean"]) if len(table) else table
    if len(ok):
        top = ok.iloc[0]
        best_recipe = str(out / "best.yaml")
        write_best_recipe(out / "best.yaml", plan, grid, top)
    columns = ["trial", "status", "epochs", "best_val_auc_mean", "best_val_f1_mean", "best_val_ap_mean", *plan.space.params]
    text = ok.head(5)[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-") if len(ok) else "no trial reported a result"
    counts = table["status"].value_counts() if len(table) else {}
    return {"table": f"top {min(5, len(ok))} of {len(table)} trial(s) by {METRIC}:\n{text}", "trials": len(table),
            "errors": int(counts.get("ERROR", 0)), "unfinished": int(counts.get("UNFINISHED", 0)), "best_recipe": best_recipe}


def trial_history(result):
    """One row per epoch the trial reported (the last report of an epoch that was re-run after a
    restore). Read from the trial's own epochs.jsonl: Ray rewrites its result files when PBT pauses,
    clones or restores a trial. Ray's dataframe where the trial folder is not local (URL storage)."""
    import pandas as pd

    path = Path(result.path) / HISTORY_FILE
    if not path.is_file():
        return result.metrics_dataframe
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["epoch"]] = record
    return pd.DataFrame([records[e] for e in sorted(records)])


def started_params(trial_dir: str) -> dict[str, Any]:
    """A trial's parameters when Ray has no result for it (the search was stopped while the trial
    was starting): the `params.json` Ray writes at its start, if the folder is local."""
    path = Path(trial_dir) / "params.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _trial_id(result) -> str:
    """From the trial folder's name (`run_trial_<id>_<n>_...`): under PBT a trial's last result carries its donor's id."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(result.path).name)
    return found.group(1) if found else Path(result.path).name


def wall_seconds(result) -> float | None:
    seconds = (result.metrics or {}).get("time_total_s")
    return round(float(seconds), 2) if seconds is not None else None


def _ray_statuses(experiment_dir: str) -> dict[str, str]:
    """Each trial's status in the experiment's final snapshot. Its last result's `done` flag would
    not do: a trial that finished before a `--resume` comes back without it."""
    from ray.tune import ExperimentAnalysis

    return {trial.trial_id: trial.status for trial in ExperimentAnalysis(experiment_dir).trials}


def _status(result, ray_status: str | None, epochs: int, budget: int) -> str:
    """ERROR; UNFINISHED (pending or running when the search was stopped, or ended by --time-budget
    before its first epoch: Ray marks those TERMINATED, but nothing that acts on results can have
    stopped them); DONE (ran its epoch budget); or STOPPED (by ASHA/PBT, early stopping, --trial-time
    or the --time-budget after its first epoch)."""
    if result.error is not None:
        return "ERROR"
    if ray_status not in (None, "TERMINATED", "ERROR") or epochs == 0:
        return "UNFINISHED"
    return "DONE" if epochs >= budget else "STOPPED"


def error_line(error) -> str | None:
    """The one-line cause of a failed trial (our ChexdistError message when it is one)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ours = [line for line in lines if "ChexdistError:" in line]
    line = ours[-1] if ours else (lines[-1] if lines else type(error).__name__)
    return line.split("ChexdistError:", 1)[-1].strip()


def write_best_recipe(path: Path, plan: SearchPlan, grid, top) -> None:
    """The best trial's full config as a recipe YAML (`chexdist train --recipe path/best.yaml`)."""
    params = next(r.config for r in grid if Path(r.path).name == Path(top["trial_dir"]).name)
    config = apply_overrides(plan.config, plan.space.active(params))
    config.recipe = ""
    header = (
        f"# Best trial {top['trial']} of Ray Tune experiment {plan.name}: val mean AUC {top['best_val_auc_mean']:.4f}, "
        f"F1 {top['best_val_f1_mean']:.4f} at epoch {int(top['best_epoch'])}.\n"
        f"# Search space {plan.space.path}; train.epochs is the search's per-trial budget: raise it for a full run.\n"
        f"# Train it: chexdist train --recipe {path} --out runs/best\n"
    )
    text = dump_config(config).replace("recipe: ''\n", "")
    atomic_write_text(path, header + text)
    load_config(str(path))  # what we write must load as a recipe


def _plots(out: Path, curves: dict[str, tuple[list, list]], table, plan: SearchPlan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial, (epochs, aucs) in sorted(curves.items()):
        ax.plot(epochs, aucs, marker="o", label=trial)
    ax.set(xlabel="epoch", ylabel="val mean AUROC", title=f"{plan.name}: val AUC per epoch")
    if 0 < len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, out / "val_auc_per_epoch.png", dpi=110)
    plt.close(fig)
    keys = list(plan.space.params)
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        sub = table[[key, "best_val_auc_mean"]].dropna() if len(table) else table
        if plan.space.params[key].values is not None:
            labels = [str(v) for v in plan.space.params[key].values]
            ax.scatter([labels.index(str(v)) for v in sub[key]], sub["best_val_auc_mean"])
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        else:
            ax.scatter(sub[key].astype(float), sub["best_val_auc_mean"])
            if plan.space.params[key].sampler.startswith(("log", "qlog")):
                ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best val AUC")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_save_figure(fig, out / "params_vs_auc.png", dpi=110)
    plt.close(fig)

