"""``minilora demo`` runs offline, trains (the loss drops), merges, passes its own check, quantises."""
import json

from click.testing import CliRunner

from minilora.cli.main import cli


def test_demo_end_to_end(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--steps", "12", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["check_passed"] and report["worst_error_over_bound"] <= 1.0
    if report["trained"]:
        assert report["loss_after"] < report["loss_before"] and report["logits_rel_diff"] < 1e-4
    assert report["sizes"]["merged-nf4"] < report["sizes"]["merged"] / 1.5
    for name in ("base", "adapter", "merged", "merged-nf4"):
        assert (tmp_path / "demo" / name).is_dir()
