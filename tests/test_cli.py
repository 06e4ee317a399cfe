"""The command line: fast help, one-paragraph errors with exit status 2, --debug tracebacks."""

import subprocess
import sys
import time

from pt_helpers import ROOT, run_cli


def test_help_is_fast_and_lists_commands():
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import sys; from posttrain.cli import main; sys.argv=['posttrain','--help']; main()"],
                         capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t
    assert out.returncode == 0
    assert "sft" in out.stdout and "Supervised fine-tuning" in out.stdout
    # importing torch alone takes ~2 s here; help must not
    mods = subprocess.run([sys.executable, "-c", "import sys; import posttrain.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, cwd=ROOT)
    assert mods.stdout.strip() == "False"
    assert elapsed < 5


def test_command_help_lists_keys_with_sources():
    out = run_cli("sft", "--help")
    assert out.returncode == 0
    assert "train.lr (float) = 0.001" in out.stdout
    assert "[rlhf-book SFT code: warmup 0.1]" in out.stdout


def test_config_error_is_one_paragraph_exit_2():
    out = run_cli("sft", "train.lrr=1")
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "did you mean 'train.lr'" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0


def test_data_error_names_file_row_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    out = run_cli("sft", f"data.train={bad}", f"train.output_dir={tmp_path/'run'}")
    assert out.returncode == 2
    assert f"{bad}:1: completion: missing" in out.stderr
    assert not (tmp_path / "run").exists()  # stopped before the run started


def test_debug_shows_traceback():
    out = run_cli("sft", "train.lrr=1", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_unknown_command_suggests():
    out = run_cli("sfft")
    assert out.returncode == 2 and "Did you mean 'sft'" in out.stderr


def test_the_readme_s_shorthands_reach_the_config():
    """`posttrain demo --quick` is quick=true, `posttrain pipeline FILE` is file=FILE (the dry run prints the
    resolved config)."""
    out = run_cli("demo", "--quick", "--print-config")
    assert out.returncode == 0 and "\nquick: true" in "\n" + out.stdout, out.stdout + out.stderr
    pipeline = ROOT / "posttrain" / "pipelines" / "demo.yaml"
    out = run_cli("pipeline", str(pipeline), "--print-config")
    assert out.returncode == 0 and f"file: {pipeline}" in out.stdout, out.stdout + out.stderr
