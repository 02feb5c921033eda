"""``mammo-ray index --anonymize``: a manifest, report and crop cache without any original patient ID."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest

from mammo_ray.cli import main
from mammo_ray.data.manifest import read_manifest
from mammo_ray.data.synthetic.cbis import synthesize


@pytest.fixture(scope="module")
def tcia_tree(tmp_path_factory):
    """A 5-patient synthetic TCIA download (its folders name the patients), one image deleted."""
    root = tmp_path_factory.mktemp("tcia") / "CBIS-DDSM"
    synthesize(root, patients=5, seed=11, size=(256, 160), layout="tcia", progress=False)
    images = sorted(p for p in root.rglob("*.dcm") if "full mammogram" in str(p).lower())
    missing = images[0]
    missing.unlink()  # its rows are unresolved, with a reason that quotes the path
    return root, missing


def _run(capsys, argv):
    code = main(argv + ["--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), captured.err


def _index(capsys, tcia_tree, workdir, out, *extra):
    root, _ = tcia_tree
    argv = ["index", "--root", str(root), "--out", str(out), "--workers", "1", "--workdir", str(workdir), *extra]
    return _run(capsys, argv)


def _all_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


@pytest.fixture(scope="module")
def indexed(tcia_tree, tmp_path_factory):
    """(plain manifest, anonymised manifest, its report, private folder, workdir)."""
    base = tmp_path_factory.mktemp("anon")
    workdir, private = base / "work", base / "private"
    plain_out, anon_out = workdir / "plain.parquet", workdir / "anon.parquet"
    assert main(["index", "--root", str(tcia_tree[0]), "--out", str(plain_out), "--workers", "1",
                 "--workdir", str(workdir), "--json"]) == 0  # fmt: skip
    assert main(["index", "--root", str(tcia_tree[0]), "--out", str(anon_out), "--workers", "1",
                 "--workdir", str(workdir), "--anonymize", "--anonymize-dir", str(private), "--json"]) == 0  # fmt: skip
    report = json.loads(anon_out.with_name("anon.report.json").read_text())
    return read_manifest(plain_out), read_manifest(anon_out), report, private, workdir


def test_anonymised_manifest_and_report_hold_no_original_patient_id(indexed, tcia_tree):
    plain, anon, report, private, _ = indexed
    originals = sorted(set(plain["patient_id"]))
    assert len(originals) == 5 and all(p.startswith("P_") for p in originals)
    # Every row is kept, and the unresolved ones (the deleted image) are still reported as such.
    assert len(anon) == len(plain) and (~anon["resolved"]).sum() == (~plain["resolved"]).sum() > 0
    # The plain reason quotes the case folder, which names the patient.
    assert any(p in reason for reason in plain["unresolved_reason"] for p in originals)
    text, report_text = _all_text(anon), json.dumps(report)
    for original in originals:
        assert original not in text, f"{original} left in the anonymised manifest"
        assert original not in report_text, f"{original} left in the anonymised report"
    assert anon["patient_id"].str.fullmatch(r"anon_[0-9a-f]{16}").all()
    assert anon["patient_id"].nunique() == len(originals)
    # One pseudonym per patient: the rows of a patient stay together (splits are by patient).
    pairs = set(zip(plain["patient_id"], anon["patient_id"], strict=True))
    assert len(pairs) == len(originals)
    assert report["anonymized"]["patients"] == len(originals)
    # The key is private: mode 0600, in a 0700 folder outside the workdir.
    assert stat.S_IMODE((private / "hmac.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


def test_paths_become_links_that_keep_side_and_view_and_reach_the_same_files(indexed):
    plain, anon, _, private, _ = indexed
    resolved = anon["resolved"].to_numpy()
    for before, after, side, view in zip(
        plain.loc[resolved, "image_path"], anon.loc[resolved, "image_path"], anon.loc[resolved, "side"],
        anon.loc[resolved, "view"], strict=True,
    ):  # fmt: skip
        assert os.path.dirname(after) == str(private / "links")
        assert os.path.realpath(after) == os.path.realpath(before)
        assert after.endswith(f"_{side}_{view}.dcm")
    masks = anon.loc[anon["roi_mask_path"] != "", "roi_mask_path"]
    assert len(masks) > 0 and all(os.path.islink(m) for m in masks)


def test_same_key_same_pseudonyms_other_key_other_pseudonyms(indexed, tcia_tree, tmp_path, capsys):
    _, anon, _, private, workdir = indexed
    again, other = tmp_path / "out" / "again.parquet", tmp_path / "out" / "other.parquet"
    assert _index(capsys, tcia_tree, workdir, again, "--anonymize", "--anonymize-dir", str(private))[0] == 0
    assert _index(capsys, tcia_tree, workdir, other, "--anonymize", "--anonymize-dir", str(tmp_path / "k2"))[0] == 0
    assert read_manifest(again)["patient_id"].tolist() == anon["patient_id"].tolist()
    assert read_manifest(again)["image_path"].tolist() == anon["image_path"].tolist()
    assert not set(read_manifest(other)["patient_id"]) & set(anon["patient_id"])


def test_a_private_folder_inside_the_workdir_is_refused_before_indexing(tcia_tree, tmp_path, capsys):
    workdir = tmp_path / "work"
    out = tmp_path / "shared" / "m.parquet"
    code, reply, err = _index(capsys, tcia_tree, workdir, out, "--anonymize", "--anonymize-dir", str(workdir / "keys"))
    assert code == 1 and "--anonymize-dir" in reply["error"] and "outside" in reply["error"]
    assert not out.exists() and not (workdir / "keys").exists()
    code, reply, _ = _index(capsys, tcia_tree, workdir, out, "--anonymize", "--anonymize-dir", str(out.parent / "k"))
    assert code == 1 and "inside" in reply["error"]  # beside the manifest is shared too


def _prepare(capsys, manifest, out, workdir):
    splits = out.with_suffix(".splits.json")
    assert _run(capsys, ["split", "--manifest", str(manifest), "--out", str(splits), "--workdir", str(workdir)])[0] == 0
    code, prep, err = _run(
        capsys,
        ["prepare", "--manifest", str(manifest), "--splits", str(splits), "--crop", "fixed", "--out", str(out),
         "--workdir", str(workdir), "--set", "data.cache_px=64", "--set", "data.input_px=56",
         "--set", "data.num_workers=1"],
    )  # fmt: skip
    assert code == 0, err
    return prep


def test_prepare_reads_through_the_links_and_its_cache_names_no_patient(indexed, tmp_path, capsys):
    plain, _, _, _, workdir = indexed
    cache = tmp_path / "anon-cache"
    prep = _prepare(capsys, workdir / "anon.parquet", cache, workdir)
    plain_prep = _prepare(capsys, workdir / "plain.parquet", tmp_path / "plain-cache", workdir)
    assert prep["entries"] == plain_prep["entries"] > 0  # every crop is read through its link
    assert prep["images_decoded"] == plain_prep["images_decoded"] and prep["skipped"] == plain_prep["skipped"]
    files = [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".parquet", ".json", ".yaml")]
    assert files
    for original in set(plain["patient_id"]):
        for path in files:
            assert original.encode() not in path.read_bytes(), f"{original} in {path.name}"


@pytest.mark.slow
def test_config_flag_anonymizes_the_pipeline_and_the_mlflow_datasets(tmp_path, tiny_config):
    from mammo_ray.data.anonymize import AnonymizeError
    from mammo_ray.data.pipeline import ensure_prepared
    from mammo_ray.train.lineage import split_datasets

    workdir = tmp_path / "work"
    plain = ensure_prepared(tiny_config("data.synth_patients=8"), workdir, progress=False)
    config = tiny_config("data.synth_patients=8", "data.anonymize=true", f"data.private_dir={tmp_path / 'private'}")
    anon = ensure_prepared(config, workdir, progress=False)
    assert anon.dataset_dir == plain.dataset_dir  # the image tree is shared; index, splits and cache are not
    assert anon.manifest != plain.manifest and anon.cache_dir != plain.cache_dir
    assert anon.entries == plain.entries > 0
    originals = set(read_manifest(plain.manifest)["patient_id"])
    for part, dataset in split_datasets(anon).items():  # what every training run logs to MLflow
        rows = dataset.df
        assert rows["patient_id"].str.startswith("anon_").all(), part
        assert not any(o in rows.to_csv() for o in originals), part
    inside = tiny_config("data.synth_patients=8", "data.anonymize=true", f"data.private_dir={workdir / 'keys'}")
    with pytest.raises(AnonymizeError, match="inside"):
        ensure_prepared(inside, workdir, progress=False)
