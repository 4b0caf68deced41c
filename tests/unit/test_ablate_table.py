"""recipes.ablate's table: mean ± sample std per metric and variant, induction per layer (no training here)."""
import math

import pytest

from recipes.ablate import format_table, mean_std, parse_variant, plot, summarise


def cell(variant, seed, top1, induction=None):
    return {"variant": variant, "seed": seed, "metrics": {"shards/zeroshot_top1": top1}, "induction": induction}


def scores(ari):
    return {"thresholds": [0.3], "images": 5, "layers": [{"ari": ari, "ari_position": 0.1, "groups": 4.0}]}


def test_mean_and_sample_std():
    assert mean_std([0.2, 0.4, 0.6]) == pytest.approx((0.4, 0.2))
    mean, std = mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)


def test_table_has_one_column_per_variant_and_induction_rows_for_scored_variants(tmp_path):
    results = [cell("clip", 0, 0.2), cell("clip", 1, 0.4), cell("hier", 0, 0.3, scores(0.2)),
               cell("hier", 1, 0.5, scores(0.4))]
    summary = summarise(results, ["clip", "hier", "absent"])
    assert list(summary) == ["clip", "hier"] and summary["clip"]["metrics"]["shards/zeroshot_top1"][0] == pytest.approx(0.3)
    table = format_table(summary)
    assert "| shards/zeroshot_top1 (%) | 30.0 ± 14.1 | 40.0 ± 14.1 |" in table
    assert "| hier | 1 | 0.300 | 4.0 | 0.300 ± 0.141 | 0.100 ± 0.000 |" in table and "| clip | 1" not in table
    plot(summary, results, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_variant_spec():
    assert parse_variant("clip=") == ("clip", [])
    assert parse_variant("h=a.b=1,c.d=x") == ("h", ["a.b=1", "c.d=x"])
    with pytest.raises(ValueError, match="NAME=key=value"):
        parse_variant("nameonly")
