"""The command line: real runs on tiny saved models, and clean one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from wandamerge.cli import main


def run(*args):
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    return result


def test_prune_saves_a_model_and_prints_a_summary(model_dir, text_file, tmp_path):
    src = model_dir("llama")
    out = tmp_path / "out"
    result = run("prune", src, "-o", out, "--method", "wanda", "--pattern", "2:4", "--calib", text_file,
                 "--nsamples", 4, "--seqlen", 16)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["overall_sparsity"] == pytest.approx(0.5)
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[1].mlp.down_proj.weight
    assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2)


def test_token_file_calibration_is_used_as_given(model_dir, tmp_path):
    src = model_dir("llama")
    tokens = torch.randint(3, 96, (3, 20))
    torch.save(tokens, tmp_path / "calib.pt")
    result = run("prune", src, "-o", tmp_path / "out", "--calib", tmp_path / "calib.pt")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "wandamerge.json").read_text())
    assert (record["settings"]["nsamples"], record["settings"]["seqlen"]) == (3, 20)


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "outside [0, 1)"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "2:5"], "divisible by 5"),
    (["--nsamples", "0"], "nsamples must be positive"),
    (["--calib", "no-such-corpus"], "no-such-corpus"),
    (["--sparsity-profile", "owl", "--pattern", "2:4"], "an N:M pattern prunes every block at N/M"),
    (["--sparsity-profile", "owll"], "did you mean 'owl'?"),
    (["--owl-lambda", "0.1"], "owl_lambda is an option of sparsity profile 'owl', not of 'uniform'"),
    (["--sparsity-map", "no-such-map.yaml"], "sparsity map no-such-map.yaml is not a file"),
])
def test_bad_settings_give_one_line_and_exit_2(model_dir, text_file, tmp_path, args, message):
    src = model_dir("llama")
    base = ["prune", src, "-o", tmp_path / "out", "--calib", text_file, "--nsamples", 2, "--seqlen", 8]
    result = run(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_model_and_non_model_directory(tmp_path):
    result = run("prune", tmp_path / "nope", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    result = run("prune", tmp_path / "empty", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "not a transformers model directory" in result.output


def test_existing_output_is_refused_unless_overwrite(model_dir, text_file, tmp_path):
    src = model_dir("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["prune", src, "-o", tmp_path / "out", "--calib", text_file, "--nsamples", 2, "--seqlen", 8]
    result = run(*args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --overwrite replaces earlier outputs only: a directory of other files is never deleted
    result = run(*args, "--overwrite")
    assert result.exit_code == 2 and "holds other files (keep.txt)" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    assert run(*args, "--overwrite").exit_code == 0  # an empty directory
    assert (tmp_path / "out" / "config.json").exists()
    (tmp_path / "out" / "extra.txt").write_text("written after the run")
    assert run(*args, "--overwrite").exit_code == 0  # an earlier output
    assert not (tmp_path / "out" / "extra.txt").exists()


def test_output_inside_the_input_model_is_refused(model_dir, text_file):
    src = model_dir("llama")
    result = run("prune", src, "-o", src / "pruned", "--calib", text_file)
    assert result.exit_code == 2 and "inside the input model" in result.output


def test_prune_with_the_owl_profile_records_each_blocks_target(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.6", "--sparsity-profile", "owl",
                 "--owl-m", "3", "--owl-lambda", "0.05", "--calib", text_file, "--nsamples", 4, "--seqlen", 16)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "wandamerge.json").read_text())
    targets = record["sparsity"]["per_block_target"]
    assert sorted(targets) == pytest.approx([0.55, 0.65])  # two blocks: the target -/+ lambda
    allocation = record["sparsity"]["allocation"]
    assert allocation["owl_m"] == 3 and len(allocation["outlier_ratios"]) == 2
    assert record["settings"]["sparsity_profile"] == "owl" and record["settings"]["owl_lambda"] == 0.05
    assert json.loads(result.stdout)["overall_sparsity"] == pytest.approx(record["sparsity"]["overall"], abs=1e-4)


def test_prune_with_a_sparsity_map_file(model_dir, text_file, tmp_path):
    (tmp_path / "map.yaml").write_text("'*.mlp.down_proj': 0.75\n'model.layers.1.*': 0.25\n")
    out = tmp_path / "out"
    result = run("prune", model_dir("llama"), "-o", out, "--sparsity-map", tmp_path / "map.yaml", "--calib",
                 text_file, "--nsamples", 4, "--seqlen", 16)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "wandamerge.json").read_text())
    targets = record["sparsity"]["per_matrix_target"]
    assert targets["model.layers.1.mlp.down_proj.weight"] == 0.75  # the first pattern that matches
    assert targets["model.layers.1.self_attn.q_proj.weight"] == 0.25
    assert targets["model.layers.0.self_attn.q_proj.weight"] == 0.5  # unmatched: --sparsity
    w = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.down_proj.weight
    assert torch.all((w == 0).sum(1) == w.shape[1] * 3 // 4)
    (tmp_path / "bad.json").write_text('{"*.mlp.*": 1.0}')
    result = run("prune", model_dir("llama"), "-o", tmp_path / "bad", "--sparsity-map", tmp_path / "bad.json")
    assert result.exit_code == 2 and "'*.mlp.*': sparsity 1.0 is outside [0, 1)" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_ppl_command_reports_perplexity(model_dir, text_file):
    result = run("ppl", model_dir("opt"), "--data", text_file, "--seqlen", 16, "--windows", 3)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["perplexity"] > 1


def test_sigterm_removes_the_staging_folder_and_spilled_files(tmp_path):
    """A run stopped by SIGTERM (kill, timeout, a scheduler) cleans up as an interrupted run does: the staging
    sibling of the output and a temporary folder beside it are gone, and the exit status is the signal's."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from wandamerge.cli import exit_on_termination
        from wandamerge.io.staging import scratch_dir, staged_output
        exit_on_termination()
        out = Path({str(tmp_path / 'out')!r})
        with staged_output(out) as staging, scratch_dir(out, 'grams'):  # as a merge's spilled Grams
            (staging / 'model.safetensors').write_bytes(b'0' * 1000)
            print('ready', flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    assert len(list(tmp_path.iterdir())) == 2  # the staging folder and the spill folder
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
