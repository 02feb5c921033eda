"""The CLI: help everywhere, one JSON object with --json, errors that name the input, the workdir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mammo_ray.cli import build_parser, main
from mammo_ray.constants import DISCLAIMER

COMMANDS = ["synth", "index", "split", "prepare", "demo"]


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json must print exactly one line"
    return json.loads(out)


def test_help_lists_commands_and_disclaimer(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(c in text for c in COMMANDS) and "For research use only" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--json" in text and "--workdir" in text and DISCLAIMER in text


def test_pipeline_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, manifest, splits, cache = (str(tmp_path / n) for n in ("d", "m.parquet", "s.json", "c"))
    synth = run_json(capsys, ["synth", "--out", data, "--patients", "6", "--seed", "1", "--size", "320x192"])
    assert synth["patients"] == 6 and synth["abnormalities"] >= 12
    index = run_json(capsys, ["index", "--root", data, "--out", manifest])
    assert {"rows", "resolved", "unresolved", "unreadable"} <= index.keys()
    assert index["rows"] == synth["abnormalities"] == index["resolved"] and index["unresolved"] == []
    split = run_json(capsys, ["split", "--manifest", manifest, "--out", splits, "--seed", "3"])
    assert split["splits"].endswith("s.json")
    prep = run_json(
        capsys,
        [
            "prepare",
            "--manifest",
            manifest,
            "--splits",
            splits,
            "--crop",
            "fixed",
            "--out",
            cache,
            "--set",
            "data.cache_px=64",
            "--set",
            "data.input_px=56",
            "--set",
            "data.num_workers=1",
        ],
    )
    assert prep["entries"] > 0 and prep["crop"] == "fixed"
    assert (tmp_path / "c" / "config.yaml").is_file() and (tmp_path / "c" / "index.parquet").is_file()
    # nothing was written outside the given paths and the default workdir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d", "m.parquet", "m.report.json", "s.json", "work"]


def test_errors_name_the_input(tmp_path, capsys):
    assert main(["split", "--manifest", str(tmp_path / "missing.parquet"), "--json", "--workdir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"].startswith(str(tmp_path / "missing.parquet"))
    assert "missing.parquet" in captured.err
    assert main(["demo", "--set", "data.crop=circle", "--workdir", str(tmp_path)]) == 2
    assert "data.crop" in capsys.readouterr().err


def test_workdir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMMO_RAY_WORKDIR", str(tmp_path / "w"))
    from mammo_ray.workdir import resolve_workdir

    assert resolve_workdir() == tmp_path / "w" and (tmp_path / "w").is_dir()
    assert resolve_workdir(str(tmp_path / "x")) == tmp_path / "x"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mammo_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "mammo-ray" in out.stdout
    assert build_parser().prog == "mammo-ray"


def test_haproxy_mode_is_refused_for_a_running_cluster_and_names_the_settings(monkeypatch, tmp_path):
    from mammo_ray.cli.serve import HAPROXY_ENV, use_haproxy

    for key in HAPROXY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1"):
        use_haproxy(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match="running cluster"):
        use_haproxy(tmp_path, "ray://head:10001")
    assert not any(key in os.environ for key in HAPROXY_ENV)  # nothing set on a refusal
    code = (  # once Serve is imported its mode is fixed: asking later is an error, not a silent no-op
        "import ray.serve; from mammo_ray.cli.serve import use_haproxy\n"
        f"try:\n    use_haproxy({str(tmp_path)!r})\nexcept RuntimeError as e:\n    print('refused:', e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("refused: use_haproxy() must run before ray.serve is imported"), out
