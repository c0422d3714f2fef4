"""Figures of the real label file (src/real_stats.py): hand-computed physics distances, and the committed
docs/real_labels.json equal to what the script computes from the real file (skipped when it is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from src import docs
from src.errors import BiomassError
from src.real_stats import OUT, collect, main, physics_distance
from src.schema import TARGET_WEIGHTS


def test_physics_distance_by_hand():
    on = [10.0, 2.0, 3.0, 13.0, 15.0]  # GDM = 10 + 3, Total = 10 + 2 + 3
    rounding = [10.0, 2.0, 3.0, 13.005, 15.0]
    off = [10.0, 2.0, 3.0, 13.0, 15.31]  # Total breaks its identity by 0.31 g
    p = physics_distance(np.array([on, rounding, off]), ["a", "b", "c"])
    assert p["images"] == 3 and p["on_set"] == 1 and p["gap_over_0.01_g"] == 1 and p["worst_image"] == "c"
    assert p["max_identity_gap_g"] == pytest.approx(0.31, abs=1e-12)
    # the projection in the weighted norm: only Total and its parts move; distance = sqrt(sum w d^2) of the move
    w = np.asarray(TARGET_WEIGHTS)
    # minimise w_G (G-10)^2 + w_D (D-2)^2 + w_C (C-3)^2 + w_GDM (G+C-13)^2 + w_T (G+D+C-15.31)^2: the residual
    # r = 0.31 splits so that every term's weighted slope is equal; solve the 3x3 normal equations directly
    a = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=float)
    y = np.array(off)
    x = np.linalg.solve(a.T @ (w[:, None] * a), a.T @ (w * y))
    move = a @ x - y
    assert p["max_move_g"] == pytest.approx(np.abs(move).max(), abs=1e-9)
    assert p["max_weighted_distance_g"] == pytest.approx(np.sqrt((w * move**2).sum()), abs=1e-9)
    assert 0 < p["max_weighted_distance_g"] < 0.31


def test_missing_real_file_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(BiomassError, match="real label file not found; pass --real PATH"):
        main(["--real", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_committed_figures_are_what_the_script_computes(real_train_csv: Path, tmp_path: Path):
    """docs/real_labels.json (rendered into README and docs/SYNTHETIC.md) == a fresh run on the real file."""
    main(["--real", str(real_train_csv), "--out", str(tmp_path / "real_labels.json")])
    fresh = json.loads((tmp_path / "real_labels.json").read_text())
    assert fresh == json.loads(OUT.read_text())
    assert fresh == json.loads(json.dumps(collect(real_train_csv)))
    physics = fresh["physics"]
    assert physics["images"] == 357 and physics["gap_over_0.01_g"] == 1
    assert physics["max_identity_gap_g"] == pytest.approx(0.3088, abs=1e-6)  # the one real exception
    assert fresh["label_stats"]["real"]["images in WA"] == "32"


def test_rendered_sections_quote_the_json():
    record = json.loads(OUT.read_text())
    table = docs._synthetic_stats(docs.REPO)
    assert table.splitlines()[0] == "| statistic | synthetic | real |"
    assert f"| images in Tas | {record['label_stats']['synthetic']['images in Tas']} |" in table
    sentence = docs._physics_labels(docs.REPO)
    assert f"{record['physics']['max_identity_gap_g']:.2f} g" in sentence
    assert record["physics"]["worst_image"] in sentence
