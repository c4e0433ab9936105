"""``minilora demo`` runs offline, trains (the loss drops), merges, passes its own check, quantises."""
import json
import subprocess
import sys


def test_demo_end_to_end(tmp_path):
    """In a subprocess, so that stdout is the real file descriptor: with --json it holds the JSON and nothing
    else (the tokenizer trainer's progress wrote three newlines there from Rust, past sys.stdout)."""
    r = subprocess.run([sys.executable, "-m", "minilora", "demo", "--out", str(tmp_path / "demo"), "--steps", "12",
                        "--json", "-q"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("{") and r.stderr == "", (r.stdout[:80], r.stderr[-400:])
    report = json.loads(r.stdout)
    assert report["check_passed"] and report["worst_error_over_bound"] <= 1.0
    if report["trained"]:
        assert report["loss_after"] < report["loss_before"] and report["logits_rel_diff"] < 1e-4
    assert report["sizes"]["merged-nf4"] < report["sizes"]["merged"] / 1.5
    for name in ("base", "adapter", "merged", "merged-nf4"):
        assert (tmp_path / "demo" / name).is_dir()
