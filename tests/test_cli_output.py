"""What a user sees (issue 22): a command prints its own lines and one summary of the known-harmless library
notices it hid; ``--verbose`` brings them all back; a real warning is never hidden."""
import subprocess

from .conftest import PY, ROOT, cli

SUMMARY = "megatron-ring: CPU mode: Transformer Engine/apex absent, torch fallbacks; "


def test_export_prints_its_result_and_one_summary_line_unless_verbose(tiny, tmp_path):
    r = cli("export", "--ckpt", tiny["mcore"], "--out", tmp_path / "a", "--tokenizer", tiny["hf"])
    assert r.stdout.splitlines() == [f"exported {tiny['mcore']} -> {tmp_path / 'a'} (tokenizer {tiny['hf']})"]
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith(SUMMARY) and err[0].endswith("--verbose shows them"), r.stderr
    v = cli("export", "--ckpt", tiny["mcore"], "--out", tmp_path / "b", "--tokenizer", tiny["hf"], "--verbose")
    assert "Transformer Engine and Apex are not installed" in v.stderr and "GPTModel IS DEPRECATED" in v.stderr
    assert len(v.stderr.splitlines()) >= 15 and SUMMARY not in v.stderr, v.stderr


def test_a_real_warning_is_shown():
    code = ("import warnings, logging\nfrom megatron_ring import quiet\nquiet.install()\n"
            "warnings.warn('Transformer Engine and Apex are not installed. Falling back to torch')\n"
            "warnings.warn('the learning rate is deprecated in spirit')\n"
            "logging.getLogger('megatron.core.models.gpt.gpt_model').warning('GPTModel IS DEPRECATED. x')\n"
            "logging.getLogger('megatron.core.models.gpt.gpt_model').warning('a real problem')\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "the learning rate is deprecated in spirit" in r.stderr and "a real problem" in r.stderr, r.stderr
    assert "Falling back to torch" not in r.stderr and "GPTModel IS DEPRECATED" not in r.stderr, r.stderr
    assert "2 known library notices hidden (TE/apex absent x1, deprecation x1)" in r.stderr, r.stderr
