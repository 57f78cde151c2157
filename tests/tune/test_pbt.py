"""Population-based training: exploit from the donor's weights, perturb, keep counting epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chexdist.config import config_from_dict, load_yaml
from tests.tune.kit import tune_args, run_cli, read_csv, trial_index


@pytest.mark.slow
def test_pbt_exploits_from_donor_weights_and_keeps_counting_epochs(ray_tmp, shards, tmp_path):
    """2 trials, 3 epochs, a PBT step every epoch: the worse trial restarts from the donor's weights
    at the exploit epoch (tensor for tensor) with a perturbed lr, and keeps counting epochs."""
    from safetensors.torch import load_file

    from chexdist.training.checkpoint import checkpoint_position, list_checkpoints

    space = tmp_path / "pbt.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\naug.preset: flip\n")
    code = run_cli(tune_args(shards, tmp_path, "pbt", "--trials", "2", "--max-epochs", "3", "--scheduler", "pbt",
                             "--perturb-epochs", "1", "--seed", "1", space=space))
    assert code == 0
    rows = read_csv(tmp_path / "pbt" / "results.csv")
    assert len(rows) == 2 and all(r["epochs"] == "3" for r in rows)
    exploited = [r for r in rows if (Path(r["trial_dir"]) / "run" / "pbt-init.safetensors").is_file()]
    assert exploited, "PBT never exploited a trial"
    # Ray's log of each exploit: [trial tag, donor tag, iterations, donor config, new config]. An exploit
    # after the trial's last epoch (it had nothing left to train) changes no run folder.
    policy = [json.loads(line) for line in (tmp_path / "pbt" / "pbt_global.txt").read_text().splitlines()]
    for row in exploited:
        mine = [(p[-2], p[-1]) for p in policy if int(p[0].split("_", 1)[0]) == trial_index(row)]
        run = Path(row["trial_dir"]) / "run"
        (donor,) = [Path(r["trial_dir"]) for r in rows if r is not row]
        cfg = config_from_dict(load_yaml(run / "config.yaml"))
        at = json.loads((run / "tune_state.json").read_text())["epoch_offset"]  # the exploit epoch
        assert cfg.model.pretrained == str(run / "pbt-init.safetensors") and cfg.train.epochs == 3 - at
        donor_at = [c for c in donor.glob("checkpoint_*") if json.loads((c / "tune_state.json").read_text())["epoch_offset"]
                    + checkpoint_position(list_checkpoints(c)[-1]).epoch == at]
        assert donor_at, f"no checkpoint of the donor {donor.name} at epoch {at}"
        want = load_file(list_checkpoints(donor_at[0])[-1] / "model.safetensors")
        got = load_file(run / "pbt-init.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        history = [json.loads(line) for line in (Path(row["trial_dir"]) / "epochs.jsonl").read_text().splitlines()]
        original = history[0]["lr"]  # epoch 1, before any exploit (the plateau schedule cannot cut lr after 1 epoch)
        assert cfg.optim.lr != pytest.approx(original)
        applied = [(donor, new) for donor, new in mine if new["optim.lr"] == pytest.approx(cfg.optim.lr)]
        assert applied and all(new["optim.lr"] != donor["optim.lr"] for donor, new in applied), mine  # perturbed, not copied
        assert [r["lr"] for r in history if r["epoch"] == at + 1][-1] == pytest.approx(cfg.optim.lr)
    for row in rows:  # the trial's own record: Ray rewrites result.json when PBT pauses and clones trials
        history = [json.loads(line) for line in (Path(row["trial_dir"]) / "epochs.jsonl").read_text().splitlines()]
        assert sorted({r["epoch"] for r in history}) == [1, 2, 3]
        assert all(0 <= r["val_auc_mean"] <= 1 for r in history)


# A pipe: shard source that SIGKILLs the trial's Ray worker once, at the first train read after
# epoch 1's validation (so in epoch 2, after epoch 1's checkpoint was reported): a lost worker.
